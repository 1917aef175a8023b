"""The loopback load test of issue 7: 8 client processes x 50 appends and 10 queries each,
pipelined, against one CPU worker with the default model and one session. Nothing lost,
nothing applied twice, each client's records in its order, every reply matched to its
request; then the same with every append sent twice (a retry right behind it)."""
import multiprocessing as mp
import os
import time

import pytest

from conftest import SRC, Worker

N_CLIENTS, N_APPENDS, N_QUERIES, WINDOW = 8, 50, 10, 4


def run_client(endpoint, k, session, retries, out):
    """One client process: its requests pipelined WINDOW at a time; returns every reply."""
    import sys
    sys.path.insert(0, str(SRC / "client" / "python"))
    import kvstream
    try:
        c = kvstream.Client(endpoint, timeout=120)
        client_id = int.from_bytes(os.urandom(8), "big") >> 1 or 1
        plan = []  # (kind, index)
        for i in range(N_APPENDS):
            plan.append(("append", i))
            if retries:
                plan.append(("retry", i))
            if i % (N_APPENDS // N_QUERIES) == N_APPENDS // N_QUERIES - 1:
                plan.append(("query", i))
        inflight, replies = {}, []
        todo = list(plan)
        while todo or inflight:
            while todo and len(inflight) < WINDOW:
                kind, i = todo.pop(0)
                if kind == "query":
                    rid = c.send("query", session=session, question="Last record?",
                                 max_tokens=3)
                else:
                    rid = c.send("session.append", session=session, text=f"c{k} r{i:02d}",
                                 client_id=client_id, client_seq=i + 1)
                inflight[rid] = (kind, i)
            rep = c.recv_any(120)
            rid = rep.get("id")
            assert rid in inflight, f"reply to an unknown or already answered id: {rep}"
            kind, i = inflight.pop(rid)
            replies.append((kind, i, rep))
        c.close()
        out.put((k, replies, None))
    except BaseException as e:  # report, do not hang the parent
        out.put((k, None, repr(e)))


def load(endpoint, session, retries):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=run_client, args=(endpoint, k, session, retries, out))
             for k in range(N_CLIENTS)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results = {}
    for _ in procs:
        k, replies, err = out.get(timeout=300)
        assert err is None, f"client {k}: {err}"
        results[k] = replies
    for p in procs:
        p.join(30)
    return results, time.monotonic() - t0


def check(client, session, results, retries, base_version):
    acks = []  # (version, client, index) of each applied append
    n_queries = 0
    final = client.info(session)
    for k, replies in results.items():
        per_seq = {}
        for kind, i, rep in replies:
            assert "error" not in rep, (k, kind, i, rep)
            if kind == "query":
                n_queries += 1
                assert "answer" in rep and base_version <= rep["version"] <= final["version"]
                continue
            per_seq.setdefault(i, []).append(rep)
        assert sorted(per_seq) == list(range(N_APPENDS)), f"client {k}: appends lost"
        versions = []
        for i in range(N_APPENDS):
            reps = per_seq[i]
            assert len(reps) == (2 if retries else 1)
            applied = [r for r in reps if not r["duplicate"]]
            assert len(applied) == 1, f"client {k} append {i} applied {len(applied)} times"
            assert all(r["version"] == applied[0]["version"] for r in reps)
            versions.append(applied[0]["version"])
            acks.append((applied[0]["version"], k, i))
        assert versions == sorted(versions), f"client {k}: applied out of its order"
    assert n_queries == N_CLIENTS * N_QUERIES
    # every version from base + 1 to the final one was made by exactly one append
    assert sorted(v for v, _, _ in acks) == list(range(base_version + 1,
                                                       base_version + 1 + len(acks)))
    assert final["version"] == base_version + N_CLIENTS * N_APPENDS
    assert final["appends"] == N_CLIENTS * N_APPENDS
    # the session's data is what the clients sent, in each client's order, once each
    recs = [r for r in client.dump(session)["text"].split("\n") if r]
    assert len(recs) == N_CLIENTS * N_APPENDS
    for k in range(N_CLIENTS):
        mine = [r for r in recs if r.split(" ")[0] == f"c{k}"]
        assert mine == [f"c{k} r{i:02d}" for i in range(N_APPENDS)], f"client {k}'s records"
    # and in the order of the acknowledged versions
    assert recs == [f"c{k} r{i:02d}" for _, k, i in sorted(acks)]


@pytest.mark.parametrize("retries", [False, True], ids=["once", "each-twice"])
def test_load_8_clients(default_model, tmp_path, retries):
    w = Worker(default_model, data_dir=tmp_path / "data", threads=2, cells=8192).start()
    try:
        c = w.client(timeout=120)
        c.create("load", cells=4096)
        results, secs = load(w.endpoint, "load", retries)
        st = c.status()
        print(f"\n{N_CLIENTS} clients x ({N_APPENDS} appends{' x2' if retries else ''} + "
              f"{N_QUERIES} queries): {secs:.1f} s; steps {st['scheduler']['steps']}, "
              f"max seqs in a step {st['scheduler']['max_n_seqs']}, rows {st['scheduler']['rows']}")
        check(c, "load", results, retries, 0)
        assert st["scheduler"]["max_n_seqs"] > 1  # work of several requests shared steps
        c.close()
    finally:
        assert w.stop() == 0
