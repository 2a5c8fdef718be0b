"""The replication channel's framing fuzzed with hypothesis, beside the
API's schemathesis run (tests/test_api.py): whatever bytes a peer sends,
the receivers answer a refusal in one line, log it once with the peer,
never let an exception out of a connection's thread and keep serving.

The receiver is the real one (slaposha.replication.receiver.Receiver serving
the rsync engine's requests too, TLS with host certificates of a test CA)
on 127.0.0.1, its client a host of the cluster. Its volume is not on btrfs
(a btrfs stream needs the lab's loop devices): a valid ``receive`` request
is refused at the volume, and the frames after a go-ahead are those of the
rsync relay (a real ``rsync --server`` reading garbage). The frames alone
are fuzzed at the Channel, over a socket pair.
"""

import json
import logging
import os
import socket
import ssl
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slaposha.lab.cluster import make_test_pki
from slaposha.replication import wire
from slaposha.replication.receiver import Receiver, TreeReceiver
from slaposha.replication.tree import MODES

EXAMPLES = 300       # each a TLS connection: about 10 ms
PUSH = ['rsync', '--server', '-logDtpre.iLsfxCIvu', '--delete', '.', 'x/']


class Site(object):
    """A receiver on hB and the files of its client, hA."""

    def __init__(self, folder):
        self.ssl = os.path.join(folder, 'ssl')
        make_test_pki(self.ssl, {'hA': '127.0.0.1', 'hB': '127.0.0.1'})
        self.volume = os.path.join(folder, 'volume')
        self.tree = os.path.join(folder, 'tree')
        self.copies = os.path.join(folder, 'copies')
        for path in (self.volume, self.tree, self.copies):
            os.makedirs(path)
        trees = TreeReceiver([self.tree], copy_roots=[self.copies],
                             idle_timeout=5)
        self.receiver = Receiver('127.0.0.1', 0, self.files('hB'),
                                 [self.volume], idle_timeout=3,
                                 hosts=['hA', 'hB'],
                                 handlers=trees.handlers)
        self.receiver.listen()
        self.port = self.receiver._sock.getsockname()[1]
        self.receiver.start()
        self.context = wire.client_context(self.files('hA'))

    def files(self, host):
        return tuple(os.path.join(self.ssl, n) for n in
                     ('ca.crt', host + '.crt', host + '.key'))

    def exchange(self, data):
        """Send ``data`` as hA, then end our side (TCP only: Python's TLS
        sockets cannot half-close): (the answer lines, whether the
        connection ended cleanly: a refusal that closes while we still send
        may reset the connection before its answer reaches us)."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_hostname='hB')
        with socket.create_connection(('127.0.0.1', self.port), 10) as sock:
            sock.settimeout(20)

            def flush():
                pending = outgoing.read()
                if pending:
                    sock.sendall(pending)

            def pull():
                chunk = sock.recv(65536)
                incoming.write(chunk) if chunk else incoming.write_eof()
                return chunk
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    flush()
                    pull()
            flush()
            try:
                if data:
                    tls.write(data)
                flush()
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # refused and closed before the end of the data
            received, whole = b'', False
            while True:
                try:
                    received += tls.read(65536)
                except ssl.SSLWantReadError:
                    try:
                        if not pull():
                            break
                    except OSError:
                        break  # reset (refused while we sent): kept so far
                except ssl.SSLZeroReturnError:
                    whole = True
                    break
                except ssl.SSLError:
                    break  # closed without a TLS goodbye
        return received, whole


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    site = Site(str(tmp_path_factory.mktemp('wire')))
    records = Records()
    logging.getLogger('slaposha').addHandler(records)
    old_level = logging.getLogger('slaposha').level
    logging.getLogger('slaposha').setLevel(logging.DEBUG)
    escaped = []
    old_hook = threading.excepthook
    threading.excepthook = escaped.append
    site.records, site.escaped = records.records, escaped
    try:
        yield site
    finally:
        threading.excepthook = old_hook
        logging.getLogger('slaposha').removeHandler(records)
        logging.getLogger('slaposha').setLevel(old_level)
        site.receiver.stop()


# -- what a peer may send ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def requests_of(site):
    """Requests of every op, each field either right or anything."""
    right = {
        'volume': st.sampled_from([site.volume, '/srv/elsewhere']),
        'tree': st.sampled_from([site.tree, '/srv/elsewhere']),
        'target': st.sampled_from([os.path.join(site.copies, 'x'),
                                   '/etc/x', site.copies + '/../x',
                                   os.path.join(site.copies, 'a\0b')]),
        'snapshot': st.sampled_from(['000001-5', '000001-5\n', '../x']),
        'parent': st.sampled_from([None, '000000-5']),
        'token': st.integers(-2, 1 << 70) | st.just(True),
        'sender': st.sampled_from(['hA', 'hB', 'hZ']),
        'created': st.floats(0, 2e9) | st.none(),
        'size': st.integers(0, 1 << 40) | st.none(),
        'keep': st.integers(-5, 1 << 70) | st.none(),
        'exported': st.sampled_from([None, [], ['000001-5'],
                                     ['../x', '000000-5']]),
        'mode': st.sampled_from(MODES + ('later',)),
        'args': st.sampled_from([PUSH, ['rsync', '--server', '--sender', '.',
                                        'x'], ['rsync', '--server', '-e',
                                               'sh', '.', 'x']]),
    }

    missing = object()

    def one(op):
        # Mostly right: the requests that pass the framing reach the
        # engines' own checks and, admitted, the relay of frames.
        fields = {name: st.one_of(right[name], right[name], right[name],
                                  json_values, st.just(missing))
                  for name in wire.REQUESTS[op]}
        return st.fixed_dictionaries(dict(fields, op=st.just(op)), optional={
            'extra': json_values}).map(lambda request: {
                k: v for k, v in request.items() if v is not missing})
    def valid(op):
        return st.fixed_dictionaries(dict(
            {name: right[name] for name in wire.REQUESTS[op]},
            op=st.just(op)))
    ops = st.sampled_from(sorted(wire.REQUESTS))
    return st.one_of(ops.flatmap(valid), ops.flatmap(valid),
                     ops.flatmap(one), ops.flatmap(one),
                     st.fixed_dictionaries({'op': json_values}))


def frames():
    """Frames as a sender writes them, or with a lying length."""
    frame = st.binary(max_size=64).map(
        lambda data: struct.pack('>I', len(data)) + data)
    lie = st.tuples(st.integers(0, (1 << 32) - 1), st.binary(max_size=16)).map(
        lambda t: struct.pack('>I', t[0]) + t[1])
    return st.lists(frame | lie, max_size=4).map(b''.join)


def lines(site):
    request = requests_of(site).map(
        lambda r: json.dumps(r).encode() + b'\n')
    broken = st.one_of(
        request.map(lambda line: line[:-1]),                  # no newline
        request.map(lambda line: line[:len(line) // 2]),      # cut
        st.binary(max_size=200),                              # garbage
        st.integers(30, 3000).map(
            lambda n: b'[' * n + b']' * n + b'\n'),           # deep
        st.just(b'{"op": "list", "volume": NaN}\n'),
        st.just(b'x' * (wire.MAX_LINE + 10) + b'\n'),          # too long
        json_values.map(lambda v: json.dumps(v).encode() + b'\n'))
    return st.one_of(request, request, broken)


# -- the properties ----------------------------------------------------------

def check_exchange(site, data):
    threads = threading.active_count()
    before, escaped = len(site.records), len(site.escaped)
    received, whole = site.exchange(data)
    # The connection's thread has said all once it ended.
    deadline = time.monotonic() + 10
    while threading.active_count() > threads and \
            time.monotonic() < deadline:
        time.sleep(0.005)
    assert received == b'' or received.endswith(b'\n'), received[-200:]
    answers = [json.loads(line) for line in received.splitlines()]
    failures = [a for a in answers if not a['ok']]
    for answer in failures:
        error = answer['error']
        assert isinstance(error, str) and error.isprintable(), error
        assert len(error) < 600, error
    # Each refusal logged once, naming the peer (hA's certificate).
    warnings = [r.getMessage() for r in site.records[before:]
                if r.levelno >= logging.WARNING]
    if whole or failures:
        assert len(warnings) == len(failures), (warnings, failures)
    else:
        assert len(warnings) <= 1, warnings
    assert all('hA' in w for w in warnings), warnings
    assert not [r for r in site.records[before:]
                if r.levelno >= logging.ERROR], warnings
    assert len(site.escaped) == escaped, site.escaped[escaped:]
    return answers


def test_fuzzed_requests_and_frames_are_refused_in_one_line(site):
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.tuples(lines(site), frames()).map(b''.join))
    @example(data=b'\n')
    @example(data=json.dumps({'op': 'rsync', 'tree': site.tree,
                              'token': 5, 'sender': 'hA', 'mode': 'live',
                              'args': PUSH}).encode() + b'\n' +
             struct.pack('>I', 3) + b'abc' + struct.pack('>I', 0))
    @example(data=json.dumps({'op': 'copy', 'target': os.path.join(
        site.copies, 'x'), 'sender': 'hA', 'args': PUSH}).encode() + b'\n'
        + struct.pack('>I', 1 << 30) + b'abc')
    @example(data=b'{"op": "list", "volume": []}\n')
    @example(data=b'{"op": ["list"]}\n')
    @example(data=b'{"op": "receive", "volume": "/v", "keep": {}}\n')
    def run(data):
        check_exchange(site, data)
    run()
    # Still serving: a host's request gets its answer.
    answers = check_exchange(site, json.dumps(
        {'op': 'list', 'volume': site.volume}).encode() + b'\n')
    assert 'not on a btrfs file system' in answers[0]['error']


@pytest.mark.parametrize('op', ['receive', 'rsync'])
def test_json_true_is_no_token(site, op):
    request = {'op': op, 'volume': site.volume, 'tree': site.tree,
               'snapshot': '000001-5', 'sender': 'hA', 'mode': 'live',
               'args': PUSH, 'token': True}
    answer, = check_exchange(site, json.dumps(request).encode() + b'\n')
    assert answer['error'] == '%s: field token must be an integer (got' \
        ' true)' % op


def test_a_request_that_trickles_is_cut_at_idle_timeout(site):
    raw = socket.create_connection(('127.0.0.1', site.port), 10)
    with site.context.wrap_socket(raw, server_hostname='hB') as sock:
        sock.settimeout(0.5)
        answer = b''
        for _ in range(20):    # 10 s at most: a byte every half second
            try:
                sock.sendall(b' ')
                answer = sock.recv(4096)
                break
            except socket.timeout:
                continue
            except OSError:
                break
    assert b'no whole request within 3 s' in answer, answer


def test_receiver_limits_connections_per_peer_and_in_all(site):
    """A peer that opens connections and sends nothing holds at most
    max_peer_connections of them, and all peers together max_connections:
    one more is closed at once, its refusal logged once with the peer
    (not once per try); once the held ones close, the peer is served
    again (a whole TLS conversation), and a new refusal is logged again."""
    receiver = Receiver('127.0.0.1', 0, site.files('hB'), [site.volume],
                        idle_timeout=20, hosts=['hA', 'hB'],
                        max_connections=3, max_peer_connections=2)
    receiver.listen()
    port = receiver._sock.getsockname()[1]
    receiver.start()
    held = []

    def connect(source='127.0.0.1'):
        sock = socket.socket()
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(('127.0.0.1', port))
        held.append(sock)
        return sock

    def closed_at_once(sock):
        try:
            return sock.recv(1) == b''
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def refusals(peer):
        return [r.getMessage() for r in site.records
                if r.getMessage().startswith('receiver: %s refused' % peer)]
    try:
        for sock in (connect(), connect()):
            sock.settimeout(0.3)
            assert not closed_at_once(sock)   # waiting for our TLS hello
        for _ in range(3):
            assert closed_at_once(connect())
        assert refusals('127.0.0.1') == [
            'receiver: 127.0.0.1 refused: it has 2 connections open (the'
            ' limit of one peer, [replication] max_peer_connections); its'
            ' next refusals are not logged until it is served again']
        other = connect('127.0.0.2')
        other.settimeout(0.3)
        assert not closed_at_once(other)
        assert closed_at_once(connect('127.0.0.3'))
        assert refusals('127.0.0.3') == [
            'receiver: 127.0.0.3 refused: 3 connections open (the limit,'
            ' [replication] max_connections); its next refusals are not'
            ' logged until it is served again']
        for sock in held:
            sock.close()
        del held[:]
        # The receiver sees the held connections end and frees them.
        channel = None
        deadline = time.monotonic() + 10
        while channel is None:
            try:
                channel = wire.connect('127.0.0.1', port, 'hB',
                                       site.files('hA'), 5)
                channel.send_json({'op': 'list', 'volume': site.volume})
                answer = channel.recv_json()
            except OSError:
                if channel is not None:
                    channel.close()
                    channel = None
                assert time.monotonic() < deadline, 'never served again'
                time.sleep(0.1)
        channel.close()
        assert isinstance(answer, dict), answer
        deadline = time.monotonic() + 10
        while receiver._peers._counts:  # its thread sees our end
            assert time.monotonic() < deadline, receiver._peers._counts
            time.sleep(0.02)
        for sock in (connect(), connect()):
            sock.settimeout(0.3)
            assert not closed_at_once(sock)
        assert closed_at_once(connect())
        assert len(refusals('127.0.0.1')) == 2
    finally:
        for sock in held:
            sock.close()
        receiver.stop()


@pytest.mark.parametrize('answer, words', [
    ({'token': '9', 'snapshots': []}, 'field token must be an integer'),
    ({'token': True, 'snapshots': []}, 'field token must be an integer'),
    ({'token': 1, 'snapshots': [{}]}, 'field snapshots must be an array'),
    ({'token': 1, 'snapshots': [], 'active': 'yes'}, 'field active'),
])
def test_the_sender_reads_a_peers_answer_within_limits(site, answer, words):
    """The owner's side: a list answer whose fields are of another type is
    one ReplicationError (before: a TypeError in the sender's cycle)."""
    from slaposha.replication import ReplicationError
    from slaposha.replication.sender import Sender
    context = wire.server_context(site.files('hB'))
    with socket.socket() as server:
        server.bind(('127.0.0.1', 0))
        server.listen(1)

        def peer():
            conn, _ = server.accept()
            with context.wrap_socket(conn, server_side=True) as tls:
                channel = wire.Channel(tls)
                channel.recv_json()
                channel.send_json(dict(answer, ok=True))
        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        sender = Sender(site.volume, 5, [('hB', '127.0.0.1',
                                          server.getsockname()[1])],
                        site.files('hA'), 'hA')
        with pytest.raises(ReplicationError) as e:
            sender.query(sender.peers[0])
        thread.join(10)
    assert '-> hB: list answer: %s' % words in str(e.value), e.value


@settings(max_examples=300, deadline=None, database=None)
@given(stream=st.lists(st.one_of(
    st.binary(max_size=40),
    st.binary(max_size=40).map(lambda d: struct.pack('>I', len(d)) + d),
    st.integers(0, (1 << 32) - 1).map(lambda n: struct.pack('>I', n)),
    st.just(b'{"ok": true}\n')), max_size=6).map(b''.join),
    reads=st.lists(st.booleans(), min_size=1, max_size=8))
def test_channel_framing_gives_bytes_an_object_or_one_wire_error(stream,
                                                                 reads):
    ours, theirs = socket.socketpair()
    try:
        ours.settimeout(5)
        theirs.sendall(stream)
        theirs.close()
        channel = wire.Channel(ours)
        got = 0
        for is_line in reads:
            try:
                if is_line:
                    value = channel.recv_json()
                    assert value is None or isinstance(value, dict)
                else:
                    value = channel.recv_frame()
                    assert isinstance(value, bytes)
                    assert len(value) <= wire.MAX_FRAME
                    got += len(value)
            except wire.WireError as e:
                assert '\n' not in str(e) and len(str(e)) < 300
                break
        assert got <= len(stream)
    finally:
        ours.close()
