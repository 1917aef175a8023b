"""CURVE on kvs-worker (PROTOCOL.md section 1, Security): keys, the ZAP allow-list, and the
rule that a non-loopback address needs CURVE or --insecure."""
import subprocess

import pytest
import zmq

import kvstream
from conftest import Worker, worker_binary

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="pyzmq's libzmq lacks CURVE")


def write_keypair(tmp_path, name):
    public, secret = zmq.curve_keypair()
    (tmp_path / f"{name}.key").write_bytes(secret + b"\n")
    (tmp_path / f"{name}.pub").write_bytes(public + b"\n")
    return public, secret


@pytest.fixture
def curve_worker(tiny_model, tmp_path):
    """A worker with --curve-secret and no allow-list, and its public key."""
    public, _ = write_keypair(tmp_path, "server")
    w = Worker(tiny_model, extra=["--curve-secret", str(tmp_path / "server.key")]).start()
    yield w, public
    assert w.stop() == 0


def test_right_key_serves(curve_worker):
    w, public = curve_worker
    with kvstream.Client(w.endpoint, timeout=10, server_key=public.decode()) as c:
        assert c.hello()["server"] == "kvs-worker"
        assert c.ping() == {"pong": True}
        c.create("s", cells=1024)
        assert c.append("s", "AAPL 189.2")["version"] == 1
        r = c.query("s", "Last AAPL price:", max_tokens=4)
        assert r["version"] == 1 and len(r["tokens"]) > 0


def test_plain_or_wrong_key_gets_no_answer(curve_worker):
    w, public = curve_worker
    wrong, _ = zmq.curve_keypair()
    with kvstream.Client(w.endpoint, timeout=1.5) as plain, \
            kvstream.Client(w.endpoint, timeout=1.5, server_key=wrong) as bad:
        for c in (plain, bad):
            with pytest.raises(kvstream.KvsTimeout):
                c.ping()
    with kvstream.Client(w.endpoint, timeout=10, server_key=public) as good:
        assert good.ping() == {"pong": True}  # the worker kept serving


def test_allow_list(tiny_model, tmp_path):
    public, _ = write_keypair(tmp_path, "server")
    allowed_pub, allowed_sec = write_keypair(tmp_path, "alice")
    (tmp_path / "clients").write_bytes(b"# allowed clients\n\n" + allowed_pub + b"\n")
    w = Worker(tiny_model, extra=["--curve-secret", str(tmp_path / "server.key"),
                                  "--curve-clients", str(tmp_path / "clients")]).start()
    try:
        with kvstream.Client(w.endpoint, timeout=1.5, server_key=public) as stranger:
            with pytest.raises(kvstream.KvsTimeout):
                stranger.ping()
        with kvstream.Client(w.endpoint, timeout=10, server_key=public, public_key=allowed_pub,
                             secret_key=allowed_sec) as alice:
            assert alice.ping() == {"pong": True}
    finally:
        assert w.stop() == 0


def test_bad_keys_are_refused_at_start(tiny_model, tmp_path):
    (tmp_path / "bad.key").write_text("not a key\n")
    write_keypair(tmp_path, "server")
    (tmp_path / "clients").write_text("# nobody\n")
    for extra in (["--curve-secret", str(tmp_path / "bad.key")],
                  ["--curve-secret", str(tmp_path / "missing.key")],
                  ["--curve-clients", str(tmp_path / "clients")],
                  ["--curve-secret", str(tmp_path / "server.key"),
                   "--curve-clients", str(tmp_path / "clients")]):
        p = subprocess.run([worker_binary(), "--model", tiny_model, *extra],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode in (1, 2), (extra, p.stderr)
        assert "kvs-worker:" in p.stderr


def test_non_loopback_needs_curve_or_insecure(tiny_model, tmp_path):
    p = subprocess.run([worker_binary(), "--model", tiny_model, "--listen", "tcp://0.0.0.0:0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "--curve-secret" in p.stderr and "--insecure" in p.stderr
    public, _ = write_keypair(tmp_path, "server")
    w = Worker(tiny_model, extra=["--curve-secret", str(tmp_path / "server.key")])
    w.start(listen="tcp://0.0.0.0:*")
    try:
        port = w.endpoint.rsplit(":", 1)[1]
        with kvstream.Client(f"tcp://127.0.0.1:{port}", timeout=10, server_key=public) as c:
            assert c.ping() == {"pong": True}
    finally:
        assert w.stop() == 0


def test_coordinator_and_worker_link(tiny_model, tmp_path):
    """A CURVE coordinator: a worker joins it with --coordinator-key (its own --curve-secret
    is its client identity, which the coordinator's allow-list names), CURVE clients reach
    it, a client not on the list does not."""
    import os
    import time
    coord_bin = os.path.join(os.path.dirname(worker_binary()), "kvs-coordinator")
    if not os.path.exists(coord_bin):
        pytest.skip("no kvs-coordinator next to kvs-worker")
    cpub, _ = write_keypair(tmp_path, "coord")
    wpub, _ = write_keypair(tmp_path, "worker")
    apub, asec = write_keypair(tmp_path, "admin")
    (tmp_path / "clients").write_bytes(wpub + b"\n" + apub + b"\n")
    coord = subprocess.Popen([coord_bin, "--listen", "tcp://127.0.0.1:0", "--store", "mem:",
                              "--heartbeat-ms", "100", "--curve-secret",
                              str(tmp_path / "coord.key"), "--curve-clients",
                              str(tmp_path / "clients"), "--worker-key",
                              str(tmp_path / "worker.pub")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    w = None
    try:
        line = coord.stdout.readline()
        assert "listening on" in line, coord.stderr.read()
        cep = line.strip().split("listening on ", 1)[1]
        w = Worker(tiny_model, extra=["--curve-secret", str(tmp_path / "worker.key"),
                                      "--coordinator", cep, "--coordinator-key",
                                      str(tmp_path / "coord.pub"), "--worker-id", "w1"]).start()
        with kvstream.Client(cep, timeout=1.5, server_key=cpub) as stranger:
            with pytest.raises(kvstream.KvsTimeout):
                stranger.ping()
        with kvstream.Client(cep, timeout=10, server_key=cpub, public_key=apub,
                             secret_key=asec) as admin:
            assert admin.hello()["server"] == "kvs-coordinator"
            deadline = time.monotonic() + 20
            workers = []
            while time.monotonic() < deadline:
                workers = admin.call("admin.workers")["workers"]
                if any(x["worker"] == "w1" and x["state"] == "ready" for x in workers):
                    break
                time.sleep(0.1)
            assert any(x["worker"] == "w1" and x["state"] == "ready" for x in workers), workers
    finally:
        if w is not None:
            assert w.stop() == 0
        coord.terminate()
        assert coord.wait(30) == 0
        coord.stdout.close()
        coord.stderr.close()


def test_cli_keygen_and_server_key(tiny_model, tmp_path):
    """kvstream keygen writes PREFIX.key (0600) and PREFIX.pub; the remote commands take the
    public key with --server-key FILE or $KVSTREAM_SERVER_KEY."""
    import os
    import stat
    cli = os.path.join(os.path.dirname(worker_binary()), "kvstream")
    if not os.path.exists(cli):
        pytest.skip("no kvstream next to kvs-worker")
    prefix = tmp_path / "srv"
    p = subprocess.run([cli, "keygen", "--out", str(prefix)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    key, pub = tmp_path / "srv.key", tmp_path / "srv.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_text().strip()) == 40 and len(pub.read_text().strip()) == 40
    assert zmq.curve_public(key.read_text().strip().encode()) == pub.read_text().strip().encode()
    p = subprocess.run([cli, "keygen", "--out", str(prefix)], capture_output=True, text=True)
    assert p.returncode == 1 and "srv.key" in p.stderr  # never replaces a key
    w = Worker(tiny_model, extra=["--curve-secret", str(key)]).start()
    try:
        env = dict(os.environ, KVSTREAM_ENDPOINT=w.endpoint)
        env.pop("KVSTREAM_SERVER_KEY", None)
        with_key = dict(env, KVSTREAM_SERVER_KEY=pub.read_text().strip())

        def run(*args, env):
            return subprocess.run([cli, *args], capture_output=True, text=True, timeout=60,
                                  env=env)

        p = run("session", "create", "k1", "--server-key", str(pub), env=env)
        assert p.returncode == 0, p.stderr
        p = run("session", "list", "-o", "json", env=with_key)
        assert p.returncode == 0 and "k1" in p.stdout, p.stderr
        p = run("session", "list", "--timeout", "800", env=env)  # no key: no answer
        assert p.returncode == 3 and "--server-key" not in p.stderr, p.stderr
    finally:
        assert w.stop() == 0
