"""The server under the HTTPS API, the health port and the unix socket:
beyond its connection limits, a new connection is closed at once and said
so; a request must come whole within the deadline, however it trickles."""

import logging
import socket
import threading
import time

from slaposha.api.server import BoundedServer, Limits, RequestHandler

release = threading.Event()


class _Slow(RequestHandler):
    def do_GET(self):
        release.wait(10)
        self.send_json(200, {'ok': True})

    def do_POST(self):
        self.send_json(200, {'body': self.read_body(1024).decode()})


def serve(limits):
    server = BoundedServer(('127.0.0.1', 0), _Slow, limits)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def ask(address, data):
    """The whole answer to ``data`` (b'' when the server closed at
    once)."""
    chunks = []
    with socket.create_connection(address, 5) as sock:
        sock.sendall(data)
        try:
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b''.join(chunks)


def test_a_connection_beyond_the_limit_is_closed_and_the_slot_comes_back(
        caplog):
    release.clear()
    server = serve(Limits(1, 1, 10.0))
    address = server.server_address
    try:
        first = socket.create_connection(address, 5)
        first.sendall(b'GET / HTTP/1.0\r\n\r\n')
        assert ask(address, b'GET / HTTP/1.0\r\n\r\n') == b''
        assert '127.0.0.1 refused: 1 connections open' in caplog.text
        release.set()
        assert first.recv(100).startswith(b'HTTP/1.0 200')
        first.close()
        # The slot is free again once the first connection ended.
        for _ in range(50):
            answer = ask(address, b'GET / HTTP/1.0\r\n\r\n')
            if answer:
                break
        assert answer.startswith(b'HTTP/1.0 200')
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_one_client_holds_at_most_its_share_of_the_connections(caplog):
    release.clear()
    server = serve(Limits(8, 2, 10.0))
    address = server.server_address
    held = []
    try:
        for _ in range(2):
            sock = socket.create_connection(address, 5)
            sock.sendall(b'GET / HTTP/1.0\r\n\r\n')
            held.append(sock)
        time.sleep(0.2)
        assert ask(address, b'GET / HTTP/1.0\r\n\r\n') == b''
        assert 'it has 2 connections open (the limit of one client)' in \
            caplog.text
    finally:
        release.set()
        for sock in held:
            sock.close()
        server.shutdown()
        server.server_close()


def test_a_trickled_request_is_cut_at_the_deadline(caplog):
    """One byte every 0.3 s restarts no clock: the whole request has
    request_timeout, then 408 (without the deadline, each byte gave the
    client another socket timeout and it kept its slot for good)."""
    caplog.set_level(logging.INFO)
    server = serve(Limits(4, 4, 1.0))
    try:
        with socket.create_connection(server.server_address, 5) as sock:
            began = time.monotonic()
            answer = b''
            for byte in b'GET / HTTP/1.0\r\nX-Slow: ' + b'a' * 100:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                sock.settimeout(0.3)
                try:
                    answer = sock.recv(4096)
                except socket.timeout:
                    continue
                break
            took = time.monotonic() - began
            sock.settimeout(5)
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b'HTTP/1.0 408'), answer
        assert b'did not come whole within 1 s' in answer
        assert 0.9 < took < 3, took
        assert 'no complete request within 1 s: cut' in caplog.text
    finally:
        server.shutdown()
        server.server_close()


def test_http_framing_is_answered_with_a_status_line():
    server = serve(Limits(4, 4, 5.0))
    address = server.server_address
    try:
        for data, status, words in [
                (b'GET /\r\n', 400, b'METHOD PATH HTTP/1.x'),
                (b'\r\n', 400, b'an empty line'),
                (b'POST / HTTP/1.1\r\nContent-Length: 2\r\n'
                 b'Content-Length: 40\r\n\r\n{}', 400, b'disagree'),
                (b'POST / HTTP/1.1\r\nContent-Length: 2\r\n'
                 b'Content-Length: 2\r\n\r\n{}', 200, b'{}'),
                (b'BREW / HTTP/1.0\r\n\r\n', 405, b'BREW')]:
            answer = ask(address, data)
            assert answer.startswith(b'HTTP/1.0 %d' % status), (data, answer)
            assert words in answer, (data, answer)
    finally:
        server.shutdown()
        server.server_close()
