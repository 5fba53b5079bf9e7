"""A policy server for real robots: one model on the GPU machine, robots call it over a websocket.

    rynn-pipe serve --checkpoint runs/demo/latest --host 0.0.0.0 --port 8000     # GPU machine

    from trainer.serve import RemotePolicy                                     # robot machine
    policy = RemotePolicy("ws://gpu-box:8000")       # the processor card arrives on connect
    actions = policy.act(instruction, state, front, wrist, prev_front=pf, prev_wrist=pw)  # (K, D)

Protocol (version 1), binary websocket messages packed with msgpack; numpy arrays travel as
`{"__nd__": 1, "dtype": "<u1", "shape": [...], "data": bytes}` (plain numeric dtypes only; no
pickle anywhere, so a message can never run code):
- on connect the server sends `{"type": "hello", "protocol": 1, "card": <processor.json>,
  "modes": [...]}`; the client checks its inputs against the card before sending them;
- request `{"id": n, "method": "act", "args": {"instruction", "state", "front", "wrist",
  "prev_front", "prev_wrist", "mode"}}` (or `"method": "card"`);
- reply `{"id": n, "ok": true, "actions": <(K, D) float64>, "seconds": s}` or
  `{"id": n, "ok": false, "kind": "bad_request" | "policy" | "malformed_actions" | "internal",
  "error": "<one line>"}` (`problems` and `tokens` too for malformed discrete generations).
A bad request gets an error reply; the connection and the server stay up. One model serves every
client: requests run one at a time on a single inference thread, in arrival order. A client that
disconnects mid-request is dropped when its reply cannot be sent. SIGINT / SIGTERM stop accepting
connections, finish the requests in flight, then close every connection (code 1001).

This module knows nothing about training; the model side is `trainer.policy.Policy`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from websockets.asyncio import server as ws_server
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from pipeline.errors import RynnError
from pipeline.progress import console
from trainer.card import MalformedActions, PolicyError, parse_card
from trainer.policy import MODES, check_state, frame_list

PROTOCOL = 1
ND = "__nd__"
DTYPES = {"|u1", "<u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8",
          "|b1"}
ACT_FIELDS = ("instruction", "state", "front", "wrist", "prev_front", "prev_wrist", "mode")


class ProtocolError(RynnError):
    """A message that is not a well-formed request (or reply) of this protocol."""


class RemoteError(PolicyError):
    """The server answered a request with an error."""


# ---------------------------------------------------------------------------------------------
# Packing (pure): msgpack with numpy arrays, no pickle.
# ---------------------------------------------------------------------------------------------

def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype.str not in DTYPES:
            raise ProtocolError(f"arrays of dtype {arr.dtype} cannot be sent (numeric only)")
        return {ND: 1, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": arr.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot pack {type(obj).__name__}")


def _decode(obj: dict) -> Any:
    if ND not in obj:
        return obj
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if dtype not in DTYPES or not isinstance(shape, list) or not isinstance(data, bytes) \
            or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ProtocolError(f"bad array header (dtype {dtype!r}, shape {shape!r}); arrays are "
                            f"{{{ND!r}: 1, 'dtype': one of {sorted(DTYPES)}, 'shape', 'data'}}")
    want = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if len(data) != want:
        raise ProtocolError(f"array data holds {len(data)} bytes, dtype {dtype} shape "
                            f"{tuple(shape)} needs {want}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpack(data: bytes | str) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise ProtocolError("text message: send binary msgpack messages")
    try:
        obj = msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        raise ProtocolError(f"not a msgpack message ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message is a map, got {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------
# Requests -> replies (pure apart from the policy call).
# ---------------------------------------------------------------------------------------------

def act_args(args: Any) -> dict[str, Any]:
    """The keyword arguments of `Policy.act` from a request's `args`."""
    if not isinstance(args, dict):
        raise ProtocolError("'args' must be a map of act's arguments")
    unknown = sorted(set(args) - set(ACT_FIELDS))
    missing = [k for k in ("instruction", "state", "front", "wrist") if k not in args]
    if unknown or missing:
        raise ProtocolError(f"act takes {list(ACT_FIELDS)}: missing {missing}, unknown {unknown}")
    if not isinstance(args["instruction"], str):
        raise ProtocolError("'instruction' must be a string")
    if args.get("mode", "continuous") not in MODES:
        raise ProtocolError(f"'mode' must be one of {MODES}, got {args.get('mode')!r}")
    return {k: v for k, v in args.items() if v is not None}


def error_reply(rid: Any, kind: str, exc: BaseException) -> dict[str, Any]:
    reply = {"id": rid, "ok": False, "kind": kind, "error": str(exc).splitlines()[0][:2000]}
    if isinstance(exc, MalformedActions):
        reply.update(problems=list(exc.problems), tokens=np.asarray(exc.tokens, np.int64))
    return reply


def handle(policy, message: dict[str, Any]) -> dict[str, Any]:
    """One request -> its reply. Runs on the inference thread."""
    rid = message.get("id")
    t0 = time.perf_counter()
    try:
        method = message.get("method")
        if method == "card":
            return {"id": rid, "ok": True, "card": policy.card.raw}
        if method != "act":
            raise ProtocolError(f"unknown method {method!r}; methods: act, card")
        actions = policy.act(**act_args(message.get("args")))
        return {"id": rid, "ok": True, "actions": np.asarray(actions, np.float64),
                "seconds": time.perf_counter() - t0}
    except ProtocolError as exc:
        return error_reply(rid, "bad_request", exc)
    except MalformedActions as exc:
        return error_reply(rid, "malformed_actions", exc)
    except RynnError as exc:                  # PolicyError and the data errors below it
        return error_reply(rid, "policy", exc)
    except Exception as exc:  # noqa: BLE001 - a bug in one request must not stop the server
        console.print(f"[red]serve: internal error[/] on request {rid!r}: {exc!r}")
        return error_reply(rid, "internal", RuntimeError(f"internal server error: {exc!r}"))


# ---------------------------------------------------------------------------------------------
# The server.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_message_mb: int = 64          # four 512 px frames are 3 MB
    ping_interval: float | None = 20.0
    drain_seconds: float = 30.0       # at shutdown, how long requests in flight may finish

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RynnError(f"--port {self.port}: must be 0..65535 (0 picks a free port)")
        if self.max_message_mb < 1:
            raise RynnError("max_message_mb must be >= 1")


class PolicyServer:
    """One `Policy` behind a websocket. `run()` blocks (the CLI); `start()` / `stop()` run it on a
    background thread (tests, notebooks)."""

    def __init__(self, policy, cfg: ServeConfig = ServeConfig()) -> None:
        self.policy, self.cfg = policy, cfg
        self.port: int | None = None
        self.in_flight = 0
        self.served = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rynn-infer")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._hello = pack({"type": "hello", "protocol": PROTOCOL, "card": policy.card.raw,
                            "modes": list(MODES)})

    # -- lifecycle

    def run(self, *, install_signals: bool = True) -> None:
        asyncio.run(self._main(install_signals))

    def start(self) -> "PolicyServer":
        self._thread = threading.Thread(target=self.run, kwargs={"install_signals": False},
                                        name="rynn-serve", daemon=True)
        self._thread.start()
        if not self.wait_ready(30):
            raise RynnError("serve: the server did not start within 30 s")
        return self

    def wait_ready(self, timeout: float) -> bool:
        """True once the server listens (its port is known)."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, finish requests in flight, close connections; wait for it."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def url(self) -> str:
        return f"ws://{self.cfg.host}:{self.port}"

    async def _main(self, install_signals: bool) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self._stop.set)
        async with ws_server.serve(self._connection, self.cfg.host, self.cfg.port,
                         max_size=self.cfg.max_message_mb << 20,
                         ping_interval=self.cfg.ping_interval) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop.wait()
            server.close(close_connections=False)      # stop accepting
            deadline = time.monotonic() + self.cfg.drain_seconds
            while self.in_flight and time.monotonic() < deadline:   # finish what was asked
                await asyncio.sleep(0.01)
            server.close(close_connections=True)
            await server.wait_closed()
        self._pool.shutdown(wait=True)

    # -- one connection

    async def _connection(self, ws) -> None:
        try:
            await ws.send(self._hello)
            async for data in ws:
                reply = await self._reply(data)
                await ws.send(pack(reply))
        except ConnectionClosed:
            pass                                     # the client left (maybe mid-request)

    async def _reply(self, data: bytes | str) -> dict[str, Any]:
        try:
            message = unpack(data)
        except ProtocolError as exc:
            return error_reply(None, "bad_request", exc)
        self.in_flight += 1
        try:
            reply = await self._loop.run_in_executor(self._pool, handle, self.policy, message)
        finally:
            self.in_flight -= 1
            self.served += 1
        return reply


def serve(policy, cfg: ServeConfig) -> None:
    """Serve until SIGINT / SIGTERM (the CLI)."""
    server = PolicyServer(policy, cfg)
    thread = threading.Thread(target=_announce, args=(server,), daemon=True)
    thread.start()
    server.run()
    console.print(f"serve: stopped after {server.served} requests")


def _announce(server: PolicyServer) -> None:
    if server.wait_ready(60):
        card = server.policy.card
        console.print(f"[bold green]serving[/] {card.recipe!r} (K={card.chunk}, D="
                      f"{card.action_dim}, {card.resolution} px) on {server.url}; Ctrl-C stops")


# ---------------------------------------------------------------------------------------------
# The client.
# ---------------------------------------------------------------------------------------------

class RemotePolicy:
    """`Policy.act` over the network. Inputs are checked against the server's processor card
    before they are sent; server errors raise `RemoteError` (or `MalformedActions`)."""

    def __init__(self, url: str, *, timeout: float = 60.0, max_message_mb: int = 64) -> None:
        self.url, self.timeout = url, timeout
        self._ws = connect(url, max_size=max_message_mb << 20, open_timeout=timeout, legacy=True)
        hello = unpack(self._ws.recv(timeout))
        if hello.get("type") != "hello" or hello.get("protocol") != PROTOCOL:
            self._ws.close()
            raise ProtocolError(f"{url}: not a rynn-pipe policy server of protocol {PROTOCOL} "
                                f"(hello: {str(hello)[:200]})")
        self.card = parse_card(hello["card"], where=f"{url} processor card")
        self._ids = itertools.count()

    def act(self, instruction: str, state, front, wrist, prev_front=None, prev_wrist=None,
            mode: str = "continuous", *, use_cache: bool = True) -> np.ndarray:
        """The next K actions (K, D) in robot units, computed by the server's model."""
        if mode not in MODES:
            raise PolicyError(f"mode must be one of {MODES}, got {mode!r}")
        if not use_cache:
            raise PolicyError("RemotePolicy: the server always decodes with the KV cache")
        state = check_state(self.card, state)
        frames = frame_list(self.card, front, wrist, prev_front, prev_wrist)
        names = ["prev_front", "prev_wrist", "front", "wrist"][4 - len(frames):]
        args = {"instruction": instruction, "state": state, "mode": mode, **dict(zip(names, frames))}
        return self.request("act", args)["actions"]

    def request(self, method: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        rid = next(self._ids)
        self._ws.send(pack({"id": rid, "method": method, "args": args or {}}))
        reply = unpack(self._ws.recv(self.timeout))
        if reply.get("id") != rid:
            raise ProtocolError(f"reply for request {reply.get('id')!r}, expected {rid}")
        if not reply.get("ok"):
            if reply.get("kind") == "malformed_actions":
                raise MalformedActions(list(reply.get("problems", [])), reply.get("tokens"))
            raise RemoteError(f"{self.url}: {reply.get('kind')}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "RemotePolicy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
