"""Micro-batch transport from the packer to the trainer ranks (ZeroMQ PUB/SUB, refs only).

The packer binds an XPUB socket (per-rank topic ``rank|<r>|``) and a READY PULL socket;
each rank connects a SUB socket, subscribes to its topic and pushes READY. Every step the
sender deals the same number of micro-batches to every rank (zero-loss padding where one
is short), so the ranks' collectives stay in step::

    sender = ZmqSender(TransportAddresses.loopback(p1, p2), world_size=2)
    receiver = ZmqReceiver(addresses, rank=0)        # in each rank
    sender.wait_ready()
    sender.send_step(0, deal(micro_batches, 2, pad))  # [topic, step, payload] per rank
    receiver.recv_step(0)                            # -> list[dict], one per micro-batch
    receiver.send_result(0, {"loss": 0.1})           # rank 0, once the step's weights are served
    sender.recv_result(0)                            # -> {"loss": 0.1}, back on the READY channel

Payloads are msgpack of plain dicts (``MicroBatch.to_wire()``); any pixel field is refused
before sending, so the wire carries refs only. Per-token lists travel compact (see
``encode_payload``) and are decoded back to the same lists. ``InMemoryHub`` is a fake with
the same interface for tests that need no sockets.
"""

from __future__ import annotations

import json
import queue
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

from mmref.renderers.refs import reject_pixel_payload
from mmref.trainer.errors import ReadyTimeoutError, ReceiveTimeoutError, StepMismatchError, TransportError

_STEP = struct.Struct(">q")
_READY = b"READY"
_RESULT = b"RESULT"


def topic(rank: int) -> bytes:
    """Topic that routes a message to one rank: ``rank|<r>|`` (the trailing bar keeps 1 from matching 10)."""
    return f"rank|{rank}|".encode()


@dataclass(frozen=True)
class TransportAddresses:
    """Where the packer binds: ``pub`` for micro-batches, ``ready`` for the READY barrier."""

    pub: str
    ready: str

    @classmethod
    def loopback(cls, pub_port: int, ready_port: int) -> TransportAddresses:
        return cls.on("127.0.0.1", pub_port, ready_port)

    @classmethod
    def on(cls, host: str, pub_port: int, ready_port: int) -> TransportAddresses:
        """``tcp://host:port`` for both sockets; ``[::1]``-style brackets for IPv6 hosts.

        >>> TransportAddresses.on("0.0.0.0", 5555, 5556).pub
        'tcp://0.0.0.0:5555'
        """
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return cls(pub=f"tcp://{host}:{pub_port}", ready=f"tcp://{host}:{ready_port}")


@dataclass(frozen=True)
class TransportEndpoints:
    """Where the packer binds (``bind``) and where ranks, maybe on other nodes, connect (``connect``).

        >>> e = TransportEndpoints.of("0.0.0.0", "orchestrator", 5555, 5556)
        >>> e.bind.pub, e.connect.pub
        ('tcp://0.0.0.0:5555', 'tcp://orchestrator:5555')
    """

    bind: TransportAddresses
    connect: TransportAddresses

    @classmethod
    def of(cls, bind_host: str, connect_host: str | None, pub_port: int, ready_port: int) -> TransportEndpoints:
        connect = connect_host or bind_host
        return cls(TransportAddresses.on(bind_host, pub_port, ready_port),
                   TransportAddresses.on(connect, pub_port, ready_port))


@dataclass(frozen=True)
class TransportLimits:
    """Timeouts and queue bounds; every blocking call of the transport honours one of them."""

    ready_timeout_s: float = 60.0
    recv_timeout_s: float = 120.0
    send_timeout_s: float = 30.0
    # 64 steps of backlog per rank: enough to overlap packing with a slow step, small enough
    # that a dead rank shows up as a send timeout instead of unbounded memory.
    high_water_mark: int = 64


def deal(micro_batches: Sequence[Any], world_size: int, pad: Callable[[int], Any]) -> list[list[Any]]:
    """Deal micro-batches round-robin; ranks that come up short get ``pad(rank)`` (zero-loss).

    >>> deal(["a", "b", "c"], 2, lambda r: "pad")
    [['a', 'c'], ['b', 'pad']]
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    per_rank: list[list[Any]] = [list(micro_batches[r::world_size]) for r in range(world_size)]
    # Every rank needs at least one micro-batch so each runs the same forward/backward count.
    count = max(1, max(len(batches) for batches in per_rank))
    for rank, batches in enumerate(per_rank):
        batches.extend(pad(rank) for _ in range(count - len(batches)))
    return per_rank


# Compact arrays. msgpack spends 5 B on a token id >= 65536, 9 B on every float and 1 B on a
# bool: 24 B a token for a packed row. A list of COMPACT_MIN_LEN or more values of one type
# travels as one ext value holding a little-endian numpy buffer instead: ints in the smallest
# dtype that holds them (token ids: int32), bools as bits, floats as float32 where every value
# survives the round trip exactly (sampled logprobs are float32 already), else float64; about
# 12 B a token. Decoding gives back the same Python list (same values, same types).
_ARRAY_EXT = 1
_ARRAY_HEAD = struct.Struct("<BI")  # kind, element count
COMPACT_MIN_LEN = 16
_KINDS = {0: np.dtype("<i1"), 1: np.dtype("<i2"), 2: np.dtype("<i4"), 3: np.dtype("<i8"),
          4: np.dtype("<f4"), 5: np.dtype("<f8")}
_BITS = 6  # bools, packed 8 to a byte


def _compact_array(values: list) -> msgpack.ExtType | None:
    """One ext value for a homogeneous list of bools, ints or floats; None leaves it a plain list."""
    types = set(map(type, values))
    if types == {bool}:
        return msgpack.ExtType(_ARRAY_EXT, _ARRAY_HEAD.pack(_BITS, len(values)) + np.packbits(values).tobytes())
    if types == {int}:
        try:
            array = np.array(values, dtype=np.int64)
        except OverflowError:
            return None
        low, high = int(array.min()), int(array.max())
        kind = next(k for k in range(4) if np.iinfo(_KINDS[k]).min <= low and high <= np.iinfo(_KINDS[k]).max)
    elif types == {float}:
        array = np.array(values, dtype=np.float64)
        with np.errstate(over="ignore"):  # 1e300 -> inf in float32: then it stays float64
            narrow = array.astype(np.float32)
        kind = 4 if np.array_equal(narrow.astype(np.float64), array, equal_nan=True) else 5
    else:
        return None
    return msgpack.ExtType(_ARRAY_EXT, _ARRAY_HEAD.pack(kind, len(values)) + array.astype(_KINDS[kind]).tobytes())


def _compact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, list):
        packed = _compact_array(value) if len(value) >= COMPACT_MIN_LEN else None
        return packed if packed is not None else [_compact(v) for v in value]
    return value


def _expand(code: int, data: bytes) -> list:
    if code != _ARRAY_EXT or len(data) < _ARRAY_HEAD.size:
        raise TransportError(f"payload holds an unknown msgpack ext value (code {code}, {len(data)} bytes)")
    kind, count = _ARRAY_HEAD.unpack_from(data)
    body = data[_ARRAY_HEAD.size:]
    if kind == _BITS and len(body) == (count + 7) // 8:
        return np.unpackbits(np.frombuffer(body, np.uint8), count=count).astype(bool).tolist()
    if kind in _KINDS and len(body) == count * _KINDS[kind].itemsize:
        return np.frombuffer(body, _KINDS[kind]).tolist()
    raise TransportError(f"payload holds a malformed compact array (kind {kind}, {count} values, {len(body)} bytes)")


def encode_payload(micro_batches: Sequence[dict], where: str = "micro-batch payload") -> bytes:
    """Msgpack of a rank's micro-batches for one step, per-token lists compact; refuses pixel tensors anywhere inside.

    >>> decode_payload(encode_payload([{"token_ids": list(range(151_000, 151_020))}]))[0]["token_ids"][:2]
    [151000, 151001]
    """
    compact = _compact(list(micro_batches))
    # Checked after compaction: per-token lists (numbers only, so no keys) are single values by
    # then, and the walk over every key costs ~1 ms instead of ~300 ms for a 32-row step.
    reject_pixel_payload(compact, where=where)
    return msgpack.packb(compact, use_bin_type=True)


def decode_payload(payload: bytes) -> list[dict]:
    """The micro-batches ``encode_payload`` packed, with every list as it was sent."""
    return msgpack.unpackb(payload, raw=False, ext_hook=_expand)


class MicroBatchSender(Protocol):
    """What the packer calls; implemented by ``ZmqSender`` and ``InMemoryHub.sender()``."""

    def wait_ready(self, timeout_s: float | None = None) -> None: ...
    def send_step(self, step: int, per_rank: Sequence[Sequence[dict]]) -> int: ...
    def recv_result(self, step: int, timeout_s: float | None = None) -> dict: ...
    def close(self) -> None: ...


class MicroBatchReceiver(Protocol):
    """What a trainer rank calls; implemented by ``ZmqReceiver`` and ``InMemoryHub.receiver(r)``."""

    rank: int

    def recv_step(self, step: int) -> list[dict]: ...
    def send_result(self, step: int, result: dict) -> None: ...
    def close(self) -> None: ...


class _StepCheck:
    """Step-tag bookkeeping on the receiving side: a gap or mismatch raises, never skips."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.last: int | None = None

    def check(self, expected: int, got: int) -> None:
        if got != expected:
            if got > expected:
                why = f"a gap: steps {expected}..{got - 1} never arrived (dropped message?)"
            else:
                why = "a stale or out-of-order step"
            raise StepMismatchError(
                f"rank {self.rank} expected micro-batches for step {expected} but received step {got}; {why}"
            )
        self.last = got


class ZmqSender:
    """Packer side: XPUB bound for micro-batches plus a PULL socket for READY messages."""

    def __init__(self, addresses: TransportAddresses, world_size: int, limits: TransportLimits = TransportLimits()) -> None:
        self.world_size = world_size
        self.limits = limits
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.XPUB)
        self._pub.setsockopt(zmq.SNDHWM, limits.high_water_mark)
        # Block (up to SNDTIMEO) when a rank's queue is full instead of PUB's default: dropping silently.
        self._pub.setsockopt(zmq.XPUB_NODROP, 1)
        self._pub.setsockopt(zmq.SNDTIMEO, int(limits.send_timeout_s * 1000))
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(addresses.pub)
        self._ready = self._ctx.socket(zmq.PULL)
        self._ready.setsockopt(zmq.LINGER, 0)
        self._ready.bind(addresses.ready)
        self.bytes_sent = 0
        self._ready_ranks: set[int] = set()
        self._subscribed: set[int] = set()

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until every rank has subscribed and sent READY; the timeout names the missing ranks.

        Both are needed: READY says the rank is up, the subscription (seen on XPUB) says the
        PUB socket will route to it, which READY alone cannot promise (PUB drops until then).
        What arrived is kept, so a caller may wait in short slices (checking its ranks between).
        """
        timeout_s = self.limits.ready_timeout_s if timeout_s is None else timeout_s
        ready, subscribed = self._ready_ranks, self._subscribed
        wanted = set(range(self.world_size))
        poller = zmq.Poller()
        poller.register(self._ready, zmq.POLLIN)
        poller.register(self._pub, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while not (wanted <= ready and wanted <= subscribed):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(wanted - (ready & subscribed))
                raise ReadyTimeoutError(
                    f"ranks {missing} did not connect within {timeout_s:.1f}s "
                    f"(READY from {sorted(ready)}, subscribed {sorted(subscribed)}, world size {self.world_size})"
                )
            for sock, _ in poller.poll(timeout=int(left * 1000) + 1):
                if sock is self._ready:
                    ready.add(_parse_ready(self._ready.recv_multipart()))
                else:
                    frame = self._pub.recv()
                    if frame[:1] == b"\x01" and frame[1:].startswith(b"rank|"):
                        subscribed.add(int(frame[1:].split(b"|")[1]))

    def recv_result(self, step: int, timeout_s: float | None = None) -> dict:
        """A rank's result of ``step`` (sent back on the READY channel); ``ReceiveTimeoutError`` after ``timeout_s``."""
        timeout_s = self.limits.recv_timeout_s if timeout_s is None else timeout_s
        if not self._ready.poll(int(timeout_s * 1000)):
            raise ReceiveTimeoutError(f"no result of step {step} from the ranks within {timeout_s:.1f}s")
        frames = self._ready.recv_multipart()
        if len(frames) != 3 or frames[0] != _RESULT:
            raise TransportError(f"malformed result message: {frames!r:.120}")
        got = _STEP.unpack(frames[1])[0]
        if got != step:
            raise StepMismatchError(f"expected the result of step {step}, got step {got}'s")
        return json.loads(frames[2])

    def send_step(self, step: int, per_rank: Sequence[Sequence[dict]]) -> int:
        """Send each rank its micro-batches for ``step`` as ``[topic, step, payload]``; returns bytes sent."""
        if len(per_rank) != self.world_size:
            raise TransportError(f"step {step}: got micro-batches for {len(per_rank)} ranks, world size is {self.world_size}")
        counts = {len(batches) for batches in per_rank}
        if len(counts) != 1:
            raise TransportError(f"step {step}: ranks would get unequal micro-batch counts {[len(b) for b in per_rank]}; use deal()")
        sent = 0
        for rank, batches in enumerate(per_rank):
            payload = encode_payload(batches, where=f"step {step} payload for rank {rank}")
            try:
                self._pub.send_multipart([topic(rank), _STEP.pack(step), payload])
            except zmq.Again as exc:
                raise TransportError(
                    f"step {step}: rank {rank}'s queue stayed full for {self.limits.send_timeout_s:.1f}s "
                    f"(high-water mark {self.limits.high_water_mark}); is the rank still alive?"
                ) from exc
            sent += len(payload)
        self.bytes_sent += sent
        return sent

    def close(self) -> None:
        self._pub.close(0)
        self._ready.close(0)
        self._ctx.term()


class ZmqReceiver:
    """Trainer-rank side: SUB on its own topic, PUSH READY once subscribed."""

    def __init__(self, addresses: TransportAddresses, rank: int, limits: TransportLimits = TransportLimits()) -> None:
        self.rank = rank
        self.limits = limits
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.RCVHWM, limits.high_water_mark)
        self._sub.setsockopt(zmq.RCVTIMEO, int(limits.recv_timeout_s * 1000))
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic(rank))
        self._sub.connect(addresses.pub)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.setsockopt(zmq.SNDTIMEO, int(limits.send_timeout_s * 1000))
        self._push.connect(addresses.ready)
        self._push.send_multipart([_READY, str(rank).encode()])
        self._steps = _StepCheck(rank)
        self.bytes_received = 0

    def recv_step(self, step: int) -> list[dict]:
        """This rank's micro-batches for ``step``; raises on a timeout, a gap or a mismatch."""
        try:
            frames = self._sub.recv_multipart()
        except zmq.Again as exc:
            raise ReceiveTimeoutError(
                f"rank {self.rank} received no micro-batches for step {step} within {self.limits.recv_timeout_s:.1f}s"
            ) from exc
        if len(frames) != 3 or frames[0] != topic(self.rank):
            raise TransportError(f"rank {self.rank} got a malformed message: {len(frames)} frames, topic {frames[0][:32]!r}")
        self._steps.check(step, _STEP.unpack(frames[1])[0])
        self.bytes_received += len(frames[2])
        return decode_payload(frames[2])

    def send_result(self, step: int, result: dict) -> None:
        """This rank's result of ``step`` (JSON-able) back to the packer."""
        self._push.send_multipart([_RESULT, _STEP.pack(step), json.dumps(result).encode()])

    def close(self) -> None:
        self._sub.close(0)
        self._push.close(0)
        self._ctx.term()


def _parse_ready(frames: list[bytes]) -> int:
    if len(frames) != 2 or frames[0] != _READY:
        raise TransportError(f"malformed READY message: {frames!r:.120}")
    return int(frames[1])


class InMemoryHub:
    """Fake transport with the ZMQ interface, one queue per rank (for single-process tests)."""

    def __init__(self, world_size: int, limits: TransportLimits = TransportLimits()) -> None:
        self.world_size = world_size
        self.limits = limits
        self._queues: list[queue.Queue[tuple[int, bytes]]] = [queue.Queue(limits.high_water_mark) for _ in range(world_size)]
        self._ready: set[int] = set()
        self._results: queue.Queue[tuple[int, dict]] = queue.Queue()

    def sender(self) -> _InMemorySender:
        return _InMemorySender(self)

    def receiver(self, rank: int) -> _InMemoryReceiver:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world size {self.world_size}")
        self._ready.add(rank)
        return _InMemoryReceiver(self, rank)


class _InMemorySender:
    def __init__(self, hub: InMemoryHub) -> None:
        self.hub = hub
        self.bytes_sent = 0

    def wait_ready(self, timeout_s: float | None = None) -> None:
        missing = sorted(set(range(self.hub.world_size)) - self.hub._ready)
        if missing:
            raise ReadyTimeoutError(f"ranks {missing} did not connect (world size {self.hub.world_size})")

    def send_step(self, step: int, per_rank: Sequence[Sequence[dict]]) -> int:
        if len(per_rank) != self.hub.world_size or len({len(b) for b in per_rank}) != 1:
            raise TransportError(f"step {step}: micro-batch counts {[len(b) for b in per_rank]} for world size {self.hub.world_size}")
        sent = 0
        for rank, batches in enumerate(per_rank):
            payload = encode_payload(batches, where=f"step {step} payload for rank {rank}")
            try:
                self.hub._queues[rank].put((step, payload), timeout=self.hub.limits.send_timeout_s)
            except queue.Full as exc:
                raise TransportError(f"step {step}: rank {rank}'s queue stayed full") from exc
            sent += len(payload)
        self.bytes_sent += sent
        return sent

    def recv_result(self, step: int, timeout_s: float | None = None) -> dict:
        timeout_s = self.hub.limits.recv_timeout_s if timeout_s is None else timeout_s
        try:
            got, result = self.hub._results.get(timeout=timeout_s)
        except queue.Empty as exc:
            raise ReceiveTimeoutError(f"no result of step {step} from the ranks within {timeout_s:.1f}s") from exc
        if got != step:
            raise StepMismatchError(f"expected the result of step {step}, got step {got}'s")
        return result

    def close(self) -> None:
        pass


class _InMemoryReceiver:
    def __init__(self, hub: InMemoryHub, rank: int) -> None:
        self.hub = hub
        self.rank = rank
        self._steps = _StepCheck(rank)

    def recv_step(self, step: int) -> list[dict]:
        try:
            got, payload = self.hub._queues[self.rank].get(timeout=self.hub.limits.recv_timeout_s)
        except queue.Empty as exc:
            raise ReceiveTimeoutError(
                f"rank {self.rank} received no micro-batches for step {step} within {self.hub.limits.recv_timeout_s:.1f}s"
            ) from exc
        self._steps.check(step, got)
        return decode_payload(payload)

    def send_result(self, step: int, result: dict) -> None:
        self.hub._results.put((step, json.loads(json.dumps(result))))  # what the wire would carry

    def close(self) -> None:
        pass
