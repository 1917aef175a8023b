"""The client: framing ["", msgpack map], request ids, streamed replies, errors."""
import itertools
import os
import time

import msgpack
import zmq

PROTOCOL_VERSION = 1
PROTOCOL_MINOR = 1  # what this client knows: cancel, flash.watch, deadline_ms, session.dump


class KvsError(Exception):
    """An error reply: code is the stable name ("NOT_FOUND"), status its number."""

    def __init__(self, code, status, message, reply=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.status = status
        self.message = message
        self.reply = reply


class KvsTimeout(KvsError):
    def __init__(self, message):
        super().__init__("TIMEOUT", -13, message)


class Client:
    def __init__(self, endpoint, timeout=30.0, context=None, rcvhwm=None, server_key=None,
                 public_key=None, secret_key=None):
        """server_key: the server's CURVE public key (40-character Z85, str or bytes) for a
        worker or coordinator run with --curve-secret (PROTOCOL.md section 1); None = plain.
        public_key/secret_key: this client's key pair (a server's --curve-clients list names
        the public one); None = a fresh pair from zmq.curve_keypair()."""
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._rcvhwm = rcvhwm
        self._curve = None
        if server_key is not None:
            if (public_key is None) != (secret_key is None):
                raise ValueError("give both public_key and secret_key, or neither")
            if public_key is None:
                public_key, secret_key = zmq.curve_keypair()
            keys = [k.encode() if isinstance(k, str) else bytes(k)
                    for k in (server_key, public_key, secret_key)]
            if any(len(k) != 40 for k in keys):
                raise ValueError("CURVE keys are 40 characters of Z85")
            self._curve = keys
        self._sock = None
        # Ids start at a random point so that two clients' ids rarely look alike in logs.
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big") + 1)
        self._pending = {}  # id -> [replies received before they were asked for]
        self.version = None
        self.minor = None
        self._connect()

    def _connect(self):
        self._sock = self._ctx.socket(zmq.DEALER)
        # Liveness as the worker does it (PROTOCOL.md section 1).
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, 250)
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
        self._sock.setsockopt(zmq.HEARTBEAT_TTL, 1000)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, 64 << 20)
        if self._rcvhwm is not None:
            self._sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        if self._curve is not None:
            server, public, secret = self._curve
            self._sock.setsockopt(zmq.CURVE_SERVERKEY, server)
            self._sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self._sock.connect(self.endpoint)

    def reconnect(self):
        """A fresh connection (a new peer identity): requests in flight are forgotten (their
        replies are lost), watches must be renewed with Watch.resume()."""
        self._sock.close(0)
        self._pending.clear()
        self._connect()

    def close(self):
        self._sock.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- transport ----------------------------------------------------------------------
    def send_raw(self, frames):
        """Send arbitrary frames (tests of bad input)."""
        self._sock.send_multipart(frames)

    def _send(self, op, fields):
        rid = next(self._ids)
        msg = {"id": rid, "op": op}
        msg.update({k: v for k, v in fields.items() if v is not None})
        self._sock.send_multipart([b"", msgpack.packb(msg, use_bin_type=True)])
        self._pending.setdefault(rid, [])
        return rid

    def recv_any(self, timeout=None):
        """The next reply of any id (a dict), or raise KvsTimeout."""
        timeout = self.timeout if timeout is None else timeout
        if not self._sock.poll(int(timeout * 1000)):
            raise KvsTimeout(f"no reply from {self.endpoint} within {timeout}s")
        frames = self._sock.recv_multipart()
        if len(frames) != 2 or frames[0] != b"":
            raise KvsError("BAD_FORMAT", -6, f"reply with {len(frames)} frames")
        return msgpack.unpackb(frames[1], raw=False)

    def _next_reply(self, rid, timeout, forget=True):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            queue = self._pending.get(rid)
            if queue:
                return queue.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                if forget:
                    self._pending.pop(rid, None)
                raise KvsTimeout(f"request {rid}: no reply within the timeout")
            rep = self.recv_any(left)
            other = rep.get("id")
            if other in self._pending:
                self._pending[other].append(rep)
            # replies to unknown ids (timed out earlier, or id 0) are dropped

    @staticmethod
    def _check(rep):
        err = rep.get("error")
        if err is not None:
            raise KvsError(err.get("code"), err.get("status"), err.get("message"), rep)
        return rep

    def call(self, op, timeout=None, **fields):
        """One request, one reply (a dict without "id"). Raises KvsError."""
        return self.wait(self.send(op, **fields), timeout)

    def send(self, op, **fields):
        """Send a request without waiting (pipelining); returns its id for wait() or cancel()."""
        return self._send(op, fields)

    def wait(self, rid, timeout=None):
        """The single reply of request rid (sent with send()), as call() returns it."""
        try:
            rep = self._next_reply(rid, timeout)
        finally:
            self._pending.pop(rid, None)
        rep = self._check(rep)
        rep.pop("id", None)
        return rep

    def stream(self, op, timeout=None, **fields):
        """A streamed request: yields each reply; the last has done=True."""
        rid = self._send(op, dict(fields, stream=True))
        expect = 0
        try:
            while True:
                rep = self._check(self._next_reply(rid, timeout))
                seq = rep.get("seq")
                if seq != expect:
                    raise KvsError("BAD_FORMAT", -6, f"seq {seq}, expected {expect}", rep)
                expect += 1
                yield rep
                if rep.get("done"):
                    return
        finally:
            self._pending.pop(rid, None)

    # ---- operations (PROTOCOL.md section 5) -------------------------------------------------
    def hello(self, versions=(PROTOCOL_VERSION,), client="kvstream-python"):
        rep = self.call("hello", versions=list(versions), client=client)
        self.version = rep["version"]
        self.minor = rep.get("minor", 0)
        return rep

    def ping(self, timeout=None):
        return self.call("ping", timeout=timeout)

    def status(self):
        return self.call("status")

    def create(self, session, prefix=None, cells=None, query_reserve=None, format=None,
               policy=None):
        return self.call("session.create", session=session, prefix=prefix, cells=cells,
                         query_reserve=query_reserve, format=format, policy=policy)

    def append(self, session, text=None, tokens=None, client_id=None, client_seq=None,
               deadline_ms=None, timeout=None):
        return self.call("session.append", timeout=timeout, session=session, text=text,
                         tokens=list(tokens) if tokens is not None else None,
                         client_id=client_id, client_seq=client_seq, deadline_ms=deadline_ms)

    def dump(self, session):
        """The recorded ids (tokens, prefix_tokens) and the data decoded (text)."""
        return self.call("session.dump", session=session)

    def cancel(self, target, timeout=None):
        """Cancel request target (an id from send(), or a Watch's id): {"cancelled": 1}, or
        KvsError NOT_FOUND when it is no longer in flight. The target itself is answered
        CANCELLED (read it with wait(target) if you care)."""
        return self.call("cancel", timeout=timeout, target=target)

    def info(self, session):
        return self.call("session.info", session=session)

    def close_session(self, session):
        return self.call("session.close", session=session)

    def list(self):
        return self.call("session.list")["sessions"]

    def snapshot(self, session, compact=False):
        return self.call("session.snapshot", session=session, compact=compact)

    def query(self, session, question, timeout=None, **opts):
        """The whole answer: answer, tokens, version, context_tokens, ttft_ms, total_ms."""
        return self.call("query", timeout=timeout, session=session, question=question, **opts)

    def query_stream(self, session, question, timeout=None, **opts):
        """Yields {"seq", "token", "text"} pieces, then the result with done=True."""
        return self.stream("query", timeout=timeout, session=session, question=question,
                           **opts)

    def flash_register(self, session, name, question, **opts):
        return self.call("flash.register", session=session, name=name, question=question,
                         **opts)

    def flash_unregister(self, session, name):
        return self.call("flash.unregister", session=session, name=name)

    def flash_list(self, session):
        return self.call("flash.list", session=session)["names"]

    def flash_get(self, session, name, allow_stale=False, timeout=None):
        return self.call("flash.get", timeout=timeout, session=session, name=name,
                         allow_stale=allow_stale)

    def watch(self, session, after_version=None, timeout=None):
        """Subscribe to the flash answers of session (PROTOCOL.md, flash.watch): a Watch,
        already confirmed by the worker. after_version: push at once the latest answer of
        each flash query newer than it (resume)."""
        w = Watch(self, session)
        w._subscribe(after_version, timeout)
        return w


class Watch:
    """A flash.watch subscription. next() returns the next answer piece (a dict with
    session, name, fresh, answer, tokens, version, ...); last_version is the highest answer
    version received, which resume() passes as after_version on a new subscription (after
    Client.reconnect(), or when the worker dropped this one)."""

    def __init__(self, client, session):
        self.client = client
        self.session = session
        self.id = None
        self.last_version = None
        self.version_at_start = None
        self._expect = 0
        self.ended = None  # the KvsError that ended it

    def _subscribe(self, after_version, timeout):
        c = self.client
        self.id = c._send("flash.watch", {"session": self.session,
                                          "after_version": after_version})
        self._expect = 0
        first = self._recv(timeout)
        if not first.get("watching"):
            raise KvsError("BAD_FORMAT", -6, f"unexpected first watch piece {first}", first)
        self.version_at_start = first.get("version")
        self.ended = None

    def _recv(self, timeout):
        c = self.client
        rep = c._next_reply(self.id, timeout, forget=False)
        seq = rep.get("seq")
        if seq is None and "error" in rep:  # refused at subscription
            c._pending.pop(self.id, None)
            c._check(rep)
        if seq != self._expect:
            raise KvsError("BAD_FORMAT", -6, f"watch seq {seq}, expected {self._expect}", rep)
        self._expect += 1
        try:
            c._check(rep)
        except KvsError as e:
            self.ended = e
            c._pending.pop(self.id, None)
            raise
        return rep

    def next(self, timeout=None):
        """The next pushed answer; KvsTimeout when none came in time (the watch goes on);
        KvsError when the watch ended (CANCELLED, NOT_FOUND: session closed)."""
        if self.ended is not None:
            raise self.ended
        rep = self._recv(timeout)
        rep.pop("id", None)
        v = rep.get("version")
        if v is not None and (self.last_version is None or v > self.last_version):
            self.last_version = v
        return rep

    def cancel(self, timeout=None):
        rep = self.client.cancel(self.id, timeout=timeout)
        try:
            while True:
                self._recv(timeout)
        except KvsError as e:
            if e.code != "CANCELLED":
                raise
        return rep

    def resume(self, timeout=None):
        """Subscribe again from last_version (on the client's current connection)."""
        self._subscribe(self.last_version if self.last_version is not None else 0, timeout)
        return self
