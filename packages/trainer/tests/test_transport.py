"""Transport: per-rank routing, READY barrier, step tags, timeouts, refs-only payloads."""

from __future__ import annotations

import socket

import pytest

from mmref.renderers.errors import RefError
from mmref.trainer.errors import ReadyTimeoutError, ReceiveTimeoutError, StepMismatchError, TransportError
from mmref.trainer.transport import (
    InMemoryHub,
    TransportAddresses,
    TransportEndpoints,
    TransportLimits,
    ZmqReceiver,
    ZmqSender,
    deal,
    topic,
)

FAST = TransportLimits(ready_timeout_s=1.0, recv_timeout_s=0.5, send_timeout_s=1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def addresses() -> TransportAddresses:
    return TransportAddresses.loopback(_free_port(), _free_port())


def _mb(tag: str) -> dict:
    return {"step": 0, "rows": [{"tag": tag, "images": ["mmref:v1:abc"]}]}


def test_deal_gives_every_rank_the_same_count_with_padding():
    assert deal(["a", "b", "c"], 2, lambda r: f"pad{r}") == [["a", "c"], ["b", "pad1"]]
    assert deal([], 3, lambda r: f"pad{r}") == [["pad0"], ["pad1"], ["pad2"]]


def test_topic_of_rank_1_is_not_a_prefix_of_rank_10():
    assert not topic(10).startswith(topic(1))


@pytest.mark.timeout(30)
def test_zmq_routes_each_rank_exactly_its_own_micro_batches(addresses):
    sender = ZmqSender(addresses, world_size=3, limits=FAST)
    receivers = [ZmqReceiver(addresses, rank=r, limits=FAST) for r in range(3)]
    try:
        sender.wait_ready()
        per_rank = [[_mb(f"r{r}s{s}") for s in range(2)] for r in range(3)]
        sent = sender.send_step(0, per_rank)
        got = [rx.recv_step(0) for rx in receivers]
        assert got == per_rank
        assert sent == sum(rx.bytes_received for rx in receivers)
        sender.send_step(1, per_rank[::-1])
        assert [rx.recv_step(1) for rx in receivers] == per_rank[::-1]
    finally:
        for rx in receivers:
            rx.close()
        sender.close()


@pytest.mark.timeout(30)
def test_ready_timeout_names_the_missing_ranks(addresses):
    sender = ZmqSender(addresses, world_size=3, limits=FAST)
    rx = ZmqReceiver(addresses, rank=1, limits=FAST)
    try:
        with pytest.raises(ReadyTimeoutError, match=r"ranks \[0, 2\]"):
            sender.wait_ready()
    finally:
        rx.close()
        sender.close()


@pytest.mark.timeout(30)
def test_ready_wait_in_slices_keeps_the_ranks_that_already_connected(addresses):
    sender = ZmqSender(addresses, world_size=2, limits=FAST)
    first = ZmqReceiver(addresses, rank=0, limits=FAST)
    receivers = [first]
    try:
        with pytest.raises(ReadyTimeoutError, match=r"ranks \[1\]"):
            sender.wait_ready(timeout_s=0.5)
        receivers.append(ZmqReceiver(addresses, rank=1, limits=FAST))
        sender.wait_ready(timeout_s=2.0)  # rank 0's READY from the first slice still counts
        sender.send_step(0, [[_mb("a")], [_mb("b")]])
        assert [rx.recv_step(0) for rx in receivers] == [[_mb("a")], [_mb("b")]]
    finally:
        for rx in receivers:
            rx.close()
        sender.close()


@pytest.mark.timeout(30)
def test_receiver_raises_on_step_mismatch(addresses):
    sender = ZmqSender(addresses, world_size=1, limits=FAST)
    rx = ZmqReceiver(addresses, rank=0, limits=FAST)
    try:
        sender.wait_ready()
        sender.send_step(5, [[_mb("x")]])
        with pytest.raises(StepMismatchError, match="expected micro-batches for step 4 but received step 5"):
            rx.recv_step(4)
    finally:
        rx.close()
        sender.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("sent", [(0, 2), (1,)], ids=["middle-step-dropped", "first-step-lost"])
def test_receiver_reports_a_missing_step_as_a_gap(addresses, sent):
    missing = min(set(range(max(sent) + 1)) - set(sent))
    sender = ZmqSender(addresses, world_size=1, limits=FAST)
    rx = ZmqReceiver(addresses, rank=0, limits=FAST)
    try:
        sender.wait_ready()
        for step in sent:
            sender.send_step(step, [[_mb(str(step))]])
        for step in range(missing):
            assert rx.recv_step(step) == [_mb(str(step))]
        with pytest.raises(StepMismatchError, match=rf"gap: steps {missing}\.\.{missing} never arrived"):
            rx.recv_step(missing)
    finally:
        rx.close()
        sender.close()


@pytest.mark.timeout(60)
def test_full_queue_of_a_rank_that_stopped_reading_is_an_error_not_a_silent_drop(addresses):
    tight = TransportLimits(ready_timeout_s=1.0, recv_timeout_s=0.5, send_timeout_s=0.3, high_water_mark=2)
    sender = ZmqSender(addresses, world_size=1, limits=tight)
    rx = ZmqReceiver(addresses, rank=0, limits=tight)  # connected, never reads
    try:
        sender.wait_ready()
        big = [{"rows": [{"tag": "x" * (1 << 20)}]}]
        with pytest.raises(TransportError, match=r"rank 0's queue stayed full for 0.3s \(high-water mark 2\)"):
            for step in range(200):  # the socket buffers absorb a few MB first
                sender.send_step(step, [big])
        assert 2 <= step < 200
    finally:
        rx.close()
        sender.close()


@pytest.mark.timeout(30)
def test_receive_timeout_raises_instead_of_hanging(addresses):
    rx = ZmqReceiver(addresses, rank=0, limits=FAST)
    try:
        with pytest.raises(ReceiveTimeoutError, match="rank 0 received no micro-batches for step 0 within 0.5s"):
            rx.recv_step(0)
    finally:
        rx.close()


@pytest.mark.timeout(30)
def test_sender_refuses_pixel_payloads_and_unequal_counts(addresses):
    sender = ZmqSender(addresses, world_size=2, limits=FAST)
    try:
        with pytest.raises(RefError, match="pixel_values"):
            sender.send_step(0, [[{"rows": [{"pixel_values": [0.0]}]}], [_mb("b")]])
        with pytest.raises(TransportError, match="unequal micro-batch counts"):
            sender.send_step(0, [[_mb("a")], []])
    finally:
        sender.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fake", [False, True], ids=["zmq", "in-memory"])
def test_a_ranks_step_result_comes_back_to_the_sender_tagged_with_its_step(addresses, fake):
    hub = InMemoryHub(1, limits=FAST) if fake else None
    sender = hub.sender() if fake else ZmqSender(addresses, world_size=1, limits=FAST)
    rx = hub.receiver(0) if fake else ZmqReceiver(addresses, rank=0, limits=FAST)
    try:
        sender.wait_ready()
        with pytest.raises(ReceiveTimeoutError, match="no result of step 0 from the ranks within 0.1s"):
            sender.recv_result(0, timeout_s=0.1)
        rx.send_result(0, {"step": 0, "loss": 0.25, "ranks": 1})
        assert sender.recv_result(0) == {"step": 0, "loss": 0.25, "ranks": 1}
        rx.send_result(2, {"step": 2})
        with pytest.raises(StepMismatchError, match="expected the result of step 1, got step 2's"):
            sender.recv_result(1)
    finally:
        rx.close()
        sender.close()


def test_in_memory_hub_matches_zmq_semantics():
    hub = InMemoryHub(2, limits=FAST)
    sender = hub.sender()
    with pytest.raises(ReadyTimeoutError, match=r"ranks \[0, 1\]"):
        sender.wait_ready()
    rx = [hub.receiver(r) for r in range(2)]
    sender.wait_ready()
    sender.send_step(0, [[_mb("a")], [_mb("b")]])
    assert rx[1].recv_step(0) == [_mb("b")]
    assert rx[0].recv_step(0) == [_mb("a")]
    sender.send_step(2, [[_mb("a")], [_mb("b")]])
    with pytest.raises(StepMismatchError, match="gap"):
        rx[0].recv_step(1)
    with pytest.raises(ReceiveTimeoutError):
        rx[0].recv_step(1)


def _packed_row_wire(advantage=lambda i: 0.1 * (i % 7)) -> dict:
    from mmref.trainer.pack import MicroBatch, PackedRow

    n = 600
    row = PackedRow(family="qwen2-vl", token_ids=[151_655] * 500 + list(range(100)), loss_mask=[i % 3 == 0 for i in range(n)],
                    advantages=[advantage(i) for i in range(n)], inference_logprobs=[-0.5] * n, images=[],
                    sample_lengths=[n], image_pad_id=151_655, sample_temperatures=[0.7])
    return MicroBatch(3, [row]).to_wire()


def test_compact_wire_decodes_to_the_same_micro_batch_with_the_same_types():
    from mmref.trainer.pack import MicroBatch
    from mmref.trainer.transport import decode_payload, encode_payload

    wire = _packed_row_wire()
    got = decode_payload(encode_payload([wire]))
    assert got == [wire]
    row = got[0]["rows"][0]
    assert all(type(v) is bool for v in row["loss_mask"]) and all(type(v) is int for v in row["token_ids"])
    assert row["advantages"] == wire["rows"][0]["advantages"]  # float64 values that float32 would round
    assert MicroBatch.from_wire(got[0]) == MicroBatch.from_wire(wire)


def test_compact_wire_is_about_half_the_plain_msgpack_of_a_packed_row():
    import msgpack

    from mmref.trainer.transport import encode_payload

    # int32 ids (4 B vs 5), bit-packed mask (1/8 B vs 1), float32 logprobs (4 B vs 9) ...
    wire = _packed_row_wire(advantage=lambda i: 1.0 if i < 300 else -1.0)
    assert len(encode_payload([wire])) <= 0.55 * len(msgpack.packb([wire], use_bin_type=True))
    # ... and advantages that float32 would round stay float64 (8 B vs 9)
    wire = _packed_row_wire()
    assert len(encode_payload([wire])) <= 0.75 * len(msgpack.packb([wire], use_bin_type=True))


@pytest.mark.parametrize("values", [
    [True, 1] * 10,                   # bool mixed with int: left a plain list, types kept
    [1, 2.5] * 10,                    # int mixed with float
    [2**63 - 1, -(2**63)] * 10,       # int64 extremes
    [float("nan"), -0.0, 1e300] * 7,  # float64-only values, NaN and signed zero
    [-(2**31) - 1, 2**31] * 10,       # needs int64
    ["a"] * 20, [[1, 2]] * 20, [None] * 20,
])
def test_compact_wire_round_trips_any_list_exactly(values):
    import math

    from mmref.trainer.transport import decode_payload, encode_payload

    got = decode_payload(encode_payload([{"v": values}]))[0]["v"]
    assert [type(v) for v in got] == [type(v) for v in values]
    assert [repr(v) for v in got] == [repr(v) for v in values]  # repr tells -0.0 from 0.0 and shows nan
    assert [math.copysign(1, v) if isinstance(v, float) else v for v in got] == \
        [math.copysign(1, v) if isinstance(v, float) else v for v in values]


def test_malformed_compact_array_is_a_transport_error():
    import msgpack

    from mmref.trainer.transport import decode_payload

    with pytest.raises(TransportError, match="malformed compact array"):
        decode_payload(msgpack.packb([msgpack.ExtType(1, b"\x02\x05\x00\x00\x00abc")]))
    with pytest.raises(TransportError, match="unknown msgpack ext"):
        decode_payload(msgpack.packb([msgpack.ExtType(9, b"")]))


def test_pixel_keys_beside_or_inside_compacted_lists_are_still_refused():
    from mmref.trainer.transport import encode_payload

    with pytest.raises(RefError, match=r"rows\[0\]\.pixel_values"):
        encode_payload([{"rows": [{"token_ids": [7] * 64, "pixel_values": [0.5] * 64}]}])
    with pytest.raises(RefError, match="image_embeds"):
        encode_payload([{"rows": [[{"image_embeds": 1}] * 20]}])


def test_endpoints_bind_one_host_and_give_ranks_another_on_the_same_ports():
    endpoints = TransportEndpoints.of("0.0.0.0", "trainer-head", 5555, 5556)
    assert (endpoints.bind.pub, endpoints.bind.ready) == ("tcp://0.0.0.0:5555", "tcp://0.0.0.0:5556")
    assert (endpoints.connect.pub, endpoints.connect.ready) == ("tcp://trainer-head:5555", "tcp://trainer-head:5556")
    assert TransportEndpoints.of("::1", None, 1, 2).connect.pub == "tcp://[::1]:1"
