"""The server under the HTTPS API and the health port: beyond its
connection limit, a new connection is closed at once and said so."""

import socket
import threading
from http.server import BaseHTTPRequestHandler

from slaposha.api.server import BoundedServer

release = threading.Event()


class _Slow(BaseHTTPRequestHandler):
    def do_GET(self):
        release.wait(10)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class _One(BoundedServer):
    max_connections = 1

    def refused(self, client_address):
        self.refusals.append(client_address[0])


def test_a_connection_beyond_the_limit_is_closed_and_the_slot_comes_back():
    server = _One(('127.0.0.1', 0), _Slow)
    server.refusals = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = server.server_address
    try:
        first = socket.create_connection(address, 5)
        first.sendall(b'GET / HTTP/1.0\r\n\r\n')
        second = socket.create_connection(address, 5)
        second.sendall(b'GET / HTTP/1.0\r\n\r\n')
        try:
            answer = second.recv(100)
        except ConnectionResetError:
            answer = b''
        assert answer == b''  # closed without an answer
        assert server.refusals == ['127.0.0.1']
        release.set()
        assert first.recv(100).startswith(b'HTTP/1.0 200')
        first.close()
        # The slot is free again once the first connection ended.
        for _ in range(50):
            third = socket.create_connection(address, 5)
            third.sendall(b'GET / HTTP/1.0\r\n\r\n')
            answer = third.recv(100)
            third.close()
            if answer:
                break
        assert answer.startswith(b'HTTP/1.0 200')
    finally:
        release.set()
        server.shutdown()
        server.server_close()
