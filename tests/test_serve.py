"""`rynn-pipe serve` / RemotePolicy on loopback: remote act equals local act, ten clients at once,
malformed messages and wrong shapes get error replies on a connection that stays up, a client
leaving mid-request does not hurt the server, shutdown finishes requests in flight.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_serve.py -q

The model is test_policy's checkpoint (the real pipeline's shards, the `test` preset).
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
from websockets.sync.client import connect

from trainer.card import MalformedActions, PolicyError
from trainer.policy import Policy
from trainer.serve import (PolicyServer, ProtocolError, RemoteError, RemotePolicy, ServeConfig,
                           pack, unpack)

from shards.shard_set import read_shard
from test_policy import build_checkpoint, first_vla, raw_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    run, pipe = build_checkpoint(tmp_path_factory.mktemp("serve"))
    policy = Policy.from_checkpoint(run, device="cpu")
    server = PolicyServer(policy, ServeConfig(host="127.0.0.1", port=0)).start()
    yield policy, server, pipe
    server.stop()


def _inputs(pipe, index: int = 0) -> dict:
    sample = first_vla(pipe) if index == 0 else \
        read_shard(pipe["shards"] / "vla-000000.tar.gz")[index]
    return raw_inputs(pipe, sample)


def _raw_client(server):
    ws = connect(server.url, legacy=True)
    hello = unpack(ws.recv(10))
    assert hello["type"] == "hello"
    return ws


def test_pack_round_trips_arrays_without_pickle():
    arrays = {"u8": np.arange(12, dtype=np.uint8).reshape(2, 2, 3), "f": np.linspace(0, 1, 5),
              "empty": np.zeros((0, 7), np.float32)}
    back = unpack(pack({"a": arrays}))["a"]
    for key, value in arrays.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].dtype == value.dtype
    with pytest.raises(ProtocolError, match="cannot be sent"):
        pack({"x": np.array([object()])})
    forged = msgpack.packb({"__nd__": 1, "dtype": "|O", "shape": [1], "data": b"\x80\x04"})
    with pytest.raises(ProtocolError, match="bad array header"):
        unpack(forged)


def test_remote_act_equals_local_act(setup):
    policy, server, pipe = setup
    with RemotePolicy(server.url) as remote:
        assert remote.card.raw == policy.card.raw          # the card arrives on connect
        for index in (0, 3):
            inputs = _inputs(pipe, index)
            np.testing.assert_array_equal(remote.act(**inputs), policy.act(**inputs))
        inputs = _inputs(pipe)
        np.testing.assert_array_equal(remote.act(**inputs, mode="discrete"),
                                      policy.act(**inputs, mode="discrete"))


def test_malformed_discrete_generation_comes_back_as_malformed_actions(setup):
    policy, server, pipe = setup
    inputs = _inputs(pipe, 3)
    try:
        policy.act(**inputs, mode="discrete")
        pytest.skip("this sample decodes well formed")
    except MalformedActions as local:
        with RemotePolicy(server.url) as remote, pytest.raises(MalformedActions) as remote_exc:
            remote.act(**inputs, mode="discrete")
        assert remote_exc.value.problems == local.problems


def test_ten_clients_at_once(setup):
    policy, server, pipe = setup
    inputs = [_inputs(pipe, i) for i in (0, 3)]
    want = [policy.act(**x) for x in inputs]
    results, errors = {}, []
    barrier = threading.Barrier(10)

    def client(n: int) -> None:
        try:
            with RemotePolicy(server.url) as remote:
                barrier.wait(30)
                results[n] = [remote.act(**inputs[(n + j) % 2]) for j in range(2)]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for n in range(10):
        for j in range(2):
            np.testing.assert_array_equal(results[n][j], want[(n + j) % 2])


def test_bad_requests_get_error_replies_and_the_connection_stays_up(setup):
    policy, server, pipe = setup
    inputs = _inputs(pipe)
    ws = _raw_client(server)
    front = np.asarray(inputs["front"])
    bad = [
        ("text frame", "hello", "text message"),
        ("not msgpack", b"\xc1\xc1", "not a msgpack message"),
        ("not a map", pack([1, 2]), "a message is a map"),
        ("unknown method", pack({"id": 1, "method": "fly"}), "unknown method 'fly'"),
        ("missing args", pack({"id": 2, "method": "act", "args": {"instruction": "x"}}),
         "missing \\['state', 'front', 'wrist'\\]"),
        ("bad mode", pack({"id": 3, "method": "act", "args": {**inputs, "mode": "psychic"}}),
         "'mode' must be one of"),
        ("short array data", pack({"id": 4, "method": "act", "args": {
            **inputs, "front": {"__nd__": 1, "dtype": "|u1", "shape": [64, 64, 3], "data": b"x"}}}),
         "array data holds 1 bytes"),
        ("wrong image shape", pack({"id": 5, "method": "act", "args": {
            **inputs, "front": front[:, :, :2]}}), "front: expected an RGB uint8"),
        ("wrong state shape", pack({"id": 6, "method": "act", "args": {
            **inputs, "state": np.zeros(3)}}), "state: expected 8 values"),
    ]
    for name, message, error in bad:
        ws.send(message)
        reply = unpack(ws.recv(30))
        assert reply["ok"] is False, name
        assert re.search(error, reply["error"]), (name, reply["error"])
        assert reply["kind"] in ("bad_request", "policy"), name
    ws.send(pack({"id": 7, "method": "act", "args": inputs}))
    reply = unpack(ws.recv(30))
    assert reply["ok"] and reply["id"] == 7
    np.testing.assert_array_equal(reply["actions"], policy.act(**inputs))
    ws.close()


def test_client_checks_inputs_against_the_card_and_raises_server_errors(setup):
    _, server, pipe = setup
    inputs = _inputs(pipe)
    with RemotePolicy(server.url) as remote:
        with pytest.raises(PolicyError, match="state: expected 8 values"):
            remote.act(**{**inputs, "state": np.zeros(5)})
        with pytest.raises(RemoteError, match="unknown method"):
            remote.request("teleport")
        assert remote.act(**inputs).shape == (remote.card.chunk, remote.card.action_dim)


def test_client_leaving_mid_request_leaves_the_server_up(setup):
    policy, server, pipe = setup
    inputs = _inputs(pipe)
    served = server.served
    for _ in range(3):
        ws = _raw_client(server)
        ws.send(pack({"id": 0, "method": "act", "args": {**inputs, "mode": "discrete"}}))
        ws.close()                                          # gone before the reply
    deadline = time.monotonic() + 60
    while server.served < served + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.served == served + 3 and server.in_flight == 0
    with RemotePolicy(server.url) as remote:
        np.testing.assert_array_equal(remote.act(**inputs), policy.act(**inputs))


def test_shutdown_finishes_requests_in_flight(setup):
    policy, _, pipe = setup
    inputs = _inputs(pipe)
    server = PolicyServer(policy, ServeConfig(port=0)).start()
    ws = _raw_client(server)
    ws.send(pack({"id": 9, "method": "act", "args": {**inputs, "mode": "discrete"}}))
    while server.in_flight == 0:
        time.sleep(0.001)
    server.stop()
    reply = unpack(ws.recv(30))                             # answered before the close
    assert reply["ok"] and reply["id"] == 9
    with pytest.raises(Exception):                          # noqa: B017 - closed (1001) or refused
        ws.recv(5)
    with pytest.raises(OSError):
        RemotePolicy(server.url, timeout=5)


def test_cli_serve_stops_gracefully_on_sigterm(setup, tmp_path):
    """`rynn-pipe serve` in its own process: announces its URL, serves, exits 0 on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    policy, _, pipe = setup
    run = Path(pipe["shards"]).parent.parent / "run"          # build_checkpoint's run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--checkpoint",
                             str(run), "--port", "0", "--device", "cpu"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        for line in proc.stdout:
            found = re.search(r"on (ws://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not announce its URL"
        inputs = _inputs(pipe)
        with RemotePolicy(url) as remote:
            np.testing.assert_array_equal(remote.act(**inputs), policy.act(**inputs))
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, rest
        assert "stopped after 1 requests" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
