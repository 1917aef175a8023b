"""kvs-worker on its scheduler (PROTOCOL.md 1.1): cancel, deadlines, flash.watch with resume,
flash.get answered by the I/O thread, clients that go away or do not read."""
import time

import pytest

import kvstream
from conftest import Worker

WORDS = " ".join(f"w{i}" for i in range(1500))
LONG = WORDS[:1300]  # one record of ~1,000 tokens: with --append-chunk 4, ~250 scheduler steps


@pytest.fixture
def slow(tiny_model, tmp_path):
    """A worker whose appends take many steps (4 rows of an append per step)."""
    w = Worker(tiny_model, data_dir=tmp_path / "data", extra=["--append-chunk", "4"]).start()
    c = w.client()
    yield w, c
    c.close()
    assert w.stop() == 0


def records(dump):
    """The text records of a raw session, in the order applied."""
    return [line for line in dump["text"].split("\n") if line]


def test_hello_minor_and_status_metrics(client):
    assert client.hello()["minor"] == 2
    client.create("m", cells=1024)
    client.append("m", "hello")
    client.query("m", "Why?", max_tokens=4)
    st = client.status()
    assert st["protocol"] == 1 and st["protocol_minor"] == 2
    sc = st["scheduler"]
    assert sc["steps"] > 0 and sc["completed"] >= 2
    assert set(sc["rows"]) == {"decode", "question", "append", "flash"}
    assert sc["rows"]["append"] >= 1 and sc["rows"]["question"] >= 1
    assert sc["rows"]["decode"] >= 1 and 0 < sc["occupancy"] <= 1 and sc["step_ms"] > 0
    assert set(sc["queued"]) == set(sc["rows"]) == set(sc["last_rows"])
    cells = st["cells"]
    assert cells["total"] == 4096 and cells["used"] > 0
    assert cells["free"] == st["capacity"]["cells_free"] and cells["reserved"] >= 1024
    assert set(st["flash"]) == {"evaluations", "wasted", "hits", "misses", "io_hits",
                                "cancelled"}
    assert 0 < sc["step_rows"] <= sc["max_batch_tokens"] and sc["target_step_ms"] > 0
    assert st["queue"]["max"] == 64 and st["watchers"] == 0


def test_cancel_queued_append_and_running_query(slow):
    _, client = slow
    client.create("c", cells=1800)
    long_id = client.send("session.append", session="c", text=LONG)
    queued = client.send("session.append", session="c", text="must not land")
    assert client.cancel(queued) == {"cancelled": 1}
    with pytest.raises(kvstream.KvsError) as e:
        client.wait(queued)
    assert e.value.code == "CANCELLED"
    assert client.wait(long_id)["version"] == 1
    with pytest.raises(kvstream.KvsError) as e:
        client.cancel(queued)  # answered already
    assert e.value.code == "NOT_FOUND"
    assert "must not land" not in client.dump("c")["text"]
    assert client.info("c")["version"] == 1

    # a long streamed answer, cancelled after its first piece
    client.create("q", cells=512)
    client.append("q", "context")
    rid = client.send("query", session="q", question="Go on:", max_tokens=1500, stream=True)
    first = client._next_reply(rid, 30)
    assert first["seq"] == 0 and "error" not in first
    assert client.cancel(rid) == {"cancelled": 1}
    pieces = [first]
    while True:
        rep = client._next_reply(rid, 30)
        pieces.append(rep)
        if rep.get("done"):
            break
    assert pieces[-1]["error"]["code"] == "CANCELLED", pieces[-1]
    assert [p["seq"] for p in pieces] == list(range(len(pieces)))
    assert len(pieces) < 1500
    assert client.status()["scheduler"]["cancelled"] >= 2
    # another connection cannot cancel this one's requests
    other = kvstream.Client(client.endpoint)
    rid = client.send("session.append", session="c", text=LONG[:200])
    with pytest.raises(kvstream.KvsError) as e:
        other.cancel(rid)
    assert e.value.code == "NOT_FOUND"
    other.close()
    assert not client.wait(rid)["duplicate"]


def test_deadlines(slow):
    _, client = slow
    client.create("d", cells=1900)
    long_id = client.send("session.append", session="d", text=LONG)
    late = client.send("session.append", session="d", text="too late", deadline_ms=1)
    with pytest.raises(kvstream.KvsError) as e:
        client.wait(late)
    assert e.value.code == "TIMEOUT"
    client.wait(long_id)
    assert "too late" not in client.dump("d")["text"]
    # a query that cannot finish in time is stopped mid-answer
    t0 = time.monotonic()
    with pytest.raises(kvstream.KvsError) as e:
        client.query("d", "Go on:", max_tokens=400, deadline_ms=30)
    assert e.value.code == "TIMEOUT"
    assert time.monotonic() - t0 < 5
    # a deferred operation (dump waits for the session's appends) expires too
    long_id = client.send("session.append", session="d", text=LONG[:500])
    with pytest.raises(kvstream.KvsError) as e:
        client.call("session.dump", session="d", deadline_ms=1)
    assert e.value.code == "TIMEOUT"
    client.wait(long_id)
    assert client.status()["scheduler"]["expired"] >= 1  # the queued append at least
    r = client.query("d", "Last word:", max_tokens=4, deadline_ms=60000)
    assert r["version"] == 2


def test_watch_push_and_resume(worker, client):
    client.create("w", cells=1024)
    client.append("w", "BTC 65000")
    client.flash_register("w", "last", "Last BTC price:", max_tokens=4)
    client.flash_register("w", "dir", "Direction:", max_tokens=3)
    watcher = worker.client()
    w = watcher.watch("w", after_version=0)  # every current answer at once
    got = {w.next(10)["name"] for _ in range(2)}
    assert got == {"last", "dir"} and w.last_version == 1
    a = client.append("w", "BTC 65100")
    seen = {}
    while len(seen) < 2:
        p = w.next(30)
        assert p["session"] == "w" and p["version"] <= a["version"]
        if p["version"] == a["version"]:
            seen[p["name"]] = p
    assert all(p["fresh"] for p in seen.values())
    assert seen["last"]["tokens"] == client.flash_get("w", "last")["tokens"]
    # a watch without after_version gets only what comes later
    w2 = client.watch("w")
    with pytest.raises(kvstream.KvsTimeout):
        w2.next(0.3)
    w2.cancel()

    # the watcher reconnects; two appends happen while it is away; it resumes
    watcher.reconnect()
    for px in (65200, 65300):
        v = client.append("w", f"BTC {px}")["version"]
    assert client.flash_get("w", "last")["fresh"]  # computed (or waited for) at v
    before = w.last_version
    w.resume(30)
    names = {}
    while len(names) < 2:
        p = w.next(30)
        assert p["version"] > before
        names[p["name"]] = p["version"]
    assert names["last"] == v
    # the session closes: the watch ends with NOT_FOUND
    client.close_session("w")
    with pytest.raises(kvstream.KvsError) as e:
        while True:
            w.next(10)
    assert e.value.code == "NOT_FOUND" and e.value.reply["done"]
    with pytest.raises(kvstream.KvsError) as e:
        watcher.watch("w")
    assert e.value.code == "NOT_FOUND"
    watcher.close()


def test_release_ends_watch_moved(worker, client):
    """session.release (a drain's first order): the session's watches end MOVED, as its later
    requests are answered (the session lives on another worker now), not NOT_FOUND."""
    client.create("r", cells=256)
    client.append("r", "BTC 65000")
    client.flash_register("r", "last", "Last BTC price:", max_tokens=2)
    watcher = worker.client()
    w = watcher.watch("r")
    rep = client.call("session.release", session="r")
    assert rep["released"] and rep["version"] == 1
    with pytest.raises(kvstream.KvsError) as e:
        while True:
            w.next(10)
    assert e.value.code == "MOVED" and e.value.reply["done"]
    with pytest.raises(kvstream.KvsError) as e:
        client.append("r", "BTC 65100")
    assert e.value.code == "MOVED"
    watcher.close()


def test_gone_watcher_is_dropped(worker, client):
    client.create("g", cells=1024)
    client.append("g", "tick 1")
    client.flash_register("g", "last", "Last tick:", max_tokens=3)
    gone = worker.client()
    gone.watch("g")
    assert client.status()["watchers"] == 1
    gone.close()
    time.sleep(0.3)  # the worker's ROUTER notices the closed connection
    deadline = time.monotonic() + 10
    i = 2
    while client.status()["watchers"] > 0:
        client.append("g", f"tick {i}")  # each new answer is pushed: the gone watcher fails
        i += 1
        assert time.monotonic() < deadline, "a gone watcher was never dropped"
    assert client.ping() == {"pong": True}


def test_flash_get_answered_by_io_thread_under_appends(default_model, tmp_path):
    """A fresh flash.get while long appends keep the engine busy: answered by the I/O thread,
    p99 <= 1 ms + p99 of a ping under the same load."""
    w = Worker(default_model, data_dir=tmp_path / "data", threads=1, cells=8192).start()
    try:
        c = w.client(timeout=120)
        c.create("f", cells=1024)
        c.append("f", "ETH 3500.5")
        c.flash_register("f", "last", "Last ETH price:", max_tokens=4)
        assert c.flash_get("f", "last")["fresh"]
        c.create("load", cells=6000)
        feeder = w.client(timeout=300)
        pending = [feeder.send("session.append", session="load", text=WORDS[:1600])
                   for _ in range(2)]
        time.sleep(0.2)
        # Up to three rounds of n get/ping pairs: a round on a loaded CI machine can have its
        # p99 inflated by the OS scheduler; an engine-thread answer (hundreds of ms behind the
        # appends) fails every round, and io_hits shows who answered.
        n, rounds = 1000, []
        for _ in range(3):
            flash_ms, ping_ms = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                g = c.flash_get("f", "last")
                flash_ms.append((time.perf_counter() - t0) * 1e3)
                assert g["fresh"] and g["version"] == 1
                t0 = time.perf_counter()
                c.ping()
                ping_ms.append((time.perf_counter() - t0) * 1e3)
            flash_ms.sort()
            ping_ms.sort()
            rounds.append((flash_ms[n // 2], flash_ms[int(0.99 * n)], ping_ms[n // 2],
                           ping_ms[int(0.99 * n)]))
            if rounds[-1][1] <= 1.0 + rounds[-1][3]:
                break
        busy = feeder._sock.poll(0) == 0  # the appends are still running after the gets
        for rid in pending:  # no need to wait for them
            try:
                feeder.cancel(rid)
            except kvstream.KvsError as e:
                assert e.code == "NOT_FOUND"  # it had finished
            with pytest.raises(kvstream.KvsError) as e:
                feeder.wait(rid)
            assert e.value.code == "CANCELLED"
        st = c.status()
        for p50f, p99f, p50p, p99p in rounds:
            print(f"\nflash.get p50 {p50f:.3f} ms p99 {p99f:.3f} ms; "
                  f"ping p50 {p50p:.3f} ms p99 {p99p:.3f} ms")
        print(f"io_hits {st['flash']['io_hits']}; appends still running after the gets: {busy}")
        assert busy, "the appends finished before the gets: no load was measured"
        assert st["flash"]["io_hits"] >= n * len(rounds)
        p99f, p99p = rounds[-1][1], rounds[-1][3]
        assert p99f <= 1.0 + p99p, \
            f"flash.get p99 {p99f:.3f} ms > 1 ms + ping p99 {p99p:.3f} ms, {len(rounds)} rounds"
        feeder.close()
        c.close()
    finally:
        assert w.stop() == 0


def test_disconnect_mid_stream_cancels_its_work(worker, client):
    client.create("x", cells=512)
    client.append("x", "some context")
    alone = client.query("x", "Summary:", max_tokens=8)
    gone = worker.client()
    rid = gone.send("query", session="x", question="Go on:", max_tokens=1500, stream=True)
    assert gone._next_reply(rid, 30)["seq"] == 0
    gone.close()
    # a client that asks for streams and never reads (small receive queue)
    slow = kvstream.Client(client.endpoint, rcvhwm=2)
    for _ in range(3):
        slow.send("query", session="x", question="More:", max_tokens=200, stream=True)
    r = client.query("x", "Summary:", max_tokens=8)
    assert r["tokens"] == alone["tokens"]  # others' answers are unaffected
    deadline = time.monotonic() + 10
    while client.status()["scheduler"]["cancelled"] < 1:
        assert time.monotonic() < deadline, "the gone client's query was never cancelled"
        time.sleep(0.1)
    slow.close()
    assert client.ping() == {"pong": True}
    assert client.info("x")["version"] == 1


def test_settled_operations_keep_the_session_order(slow):
    """Operations that need a settled session wait for the appends before them, and the
    requests after them wait behind them: the order received is the order applied."""
    _, client = slow
    client.create("o", cells=1800)
    client.create("other", cells=1800)
    ids = [client.send("session.append", session="o", text=LONG[:400]),
           client.send("session.append", session="o", tokens=[100, 200, 300]),
           client.send("session.append", session="o", text="after the tokens"),
           client.send("session.dump", session="o")]
    acks = [client.wait(i) for i in ids[:3]]
    dump = client.wait(ids[3])
    assert [a["version"] for a in acks] == [1, 2, 3] and dump["version"] == 3
    n0 = acks[0]["n_tokens"]
    assert dump["tokens"][n0:n0 + 3] == [100, 200, 300]
    assert dump["text"].endswith("after the tokens\n")
    # a close waits for the scheduler to be idle, then goes through; later requests follow it
    w = client.watch("o")
    busy = client.send("session.append", session="other", text=LONG)
    close = client.send("session.close", session="o")
    after = client.send("session.info", session="o")
    assert client.wait(close, 60) == {"closed": True}
    with pytest.raises(kvstream.KvsError) as e:
        client.wait(after)
    assert e.value.code == "NOT_FOUND"
    assert client.wait(busy)["version"] == 1
    with pytest.raises(kvstream.KvsError) as e:
        w.next(10)
    assert e.value.code == "NOT_FOUND"
    assert client.list() == ["other"]


def test_slow_watcher_is_dropped(worker, client):
    """A watcher that does not read (tiny receive buffers) is dropped once the worker cannot
    queue its pushes (its send queue of 1000 messages is full); a reading watcher of the same
    session gets every answer meanwhile."""
    import zmq
    client.create("sw", cells=1024)
    client.append("sw", "t 0")
    for i in range(32):
        client.flash_register("sw", f"q{i}", f"Tick {i}?", max_tokens=1)
    ctx = zmq.Context.instance()
    slow = kvstream.Client(client.endpoint, rcvhwm=1)
    slow._sock.close(0)  # the same, with a small kernel receive buffer
    slow._sock = ctx.socket(zmq.DEALER)
    slow._sock.setsockopt(zmq.RCVHWM, 1)
    slow._sock.setsockopt(zmq.RCVBUF, 2048)
    slow._sock.setsockopt(zmq.LINGER, 0)
    slow._sock.connect(client.endpoint)
    slow.watch("sw")
    good = worker.client()
    gw = good.watch("sw")
    received, i = 0, 1
    deadline = time.monotonic() + 90
    while client.status()["watchers_dropped"] == 0:
        assert time.monotonic() < deadline, "the slow watcher was never dropped"
        client.append("sw", f"t {i}")
        i += 1
        try:
            while True:
                gw.next(0.05)
                received += 1
        except kvstream.KvsTimeout:
            pass
    st = client.status()
    assert st["watchers"] == 1 and st["watchers_dropped"] == 1
    # the reading watcher got every answer computed (the flash cache's pushes, in order)
    try:
        while True:
            gw.next(1)
            received += 1
    except kvstream.KvsTimeout:
        pass
    evals = client.status()["flash"]["evaluations"]
    print(f"\nslow watcher dropped after {i - 1} appends; the reading watcher got {received} "
          f"answers of {evals} evaluations")
    assert received >= evals - 32 * 2  # the first evaluations came before it subscribed
    assert client.ping() == {"pong": True}
    slow.close()
    good.close()


def test_sigterm_with_work_in_flight(tiny_model, tmp_path):
    """SIGTERM while a long append, a long streamed answer, a watch and a waiting operation are
    in flight: each gets its result or a clear CANCELLED, and the worker exits 0 quickly."""
    import signal
    w = Worker(tiny_model, data_dir=tmp_path / "data", extra=["--append-chunk", "1"]).start()
    c = w.client()
    c.create("t", cells=1800)
    c.append("t", "start")
    c.flash_register("t", "f", "Now?", max_tokens=2)
    watch = c.watch("t")
    app = c.send("session.append", session="t", text=LONG)
    q = c.send("query", session="t", question="Go on:", max_tokens=1500, stream=True)
    dump = c.send("session.dump", session="t")  # waits for the append
    first = c._next_reply(q, 30)
    assert first["seq"] == 0 and "error" not in first, first
    t0 = time.monotonic()
    w.proc.send_signal(signal.SIGTERM)
    outcomes = {}
    for name, rid in (("append", app), ("dump", dump)):
        try:
            outcomes[name] = "ok" if c.wait(rid, 30) else "?"
        except kvstream.KvsError as e:
            outcomes[name] = e.code
    while True:
        rep = c._next_reply(q, 30)
        if rep.get("done"):
            outcomes["query"] = rep.get("error", {}).get("code", "ok")
            break
    with pytest.raises(kvstream.KvsError) as e:
        while True:
            watch.next(30)
    outcomes["watch"] = e.value.code
    assert w.proc.wait(30) == 0
    print(f"\nshutdown in {time.monotonic() - t0:.2f} s: {outcomes}")
    assert time.monotonic() - t0 < 10
    assert outcomes["watch"] == "CANCELLED" and outcomes["dump"] in ("ok", "CANCELLED")
    assert outcomes["append"] in ("ok", "CANCELLED") and outcomes["query"] in ("ok", "CANCELLED")
    c.close()
    w.proc.stdout.close()
    w.proc.stderr.close()
    # what was acknowledged is there after a restart
    w2 = Worker(tiny_model, data_dir=tmp_path / "data").start()
    try:
        c2 = w2.client()
        info = c2.info("t")
        assert info["version"] == (2 if outcomes["append"] == "ok" else info["version"])
        assert info["version"] >= 1
        c2.close()
    finally:
        assert w2.stop() == 0
