"""The HTTP server under the agent's HTTPS API and its health port."""

import socket
import socketserver
import threading
from http.server import ThreadingHTTPServer

__all__ = ['BoundedServer']


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once (more
    are closed at once: a flood must not exhaust the agent's threads), on
    IPv4 or IPv6 as its address is, never blocking its shutdown."""

    daemon_threads = True
    block_on_close = False
    max_connections = 64
    request_timeout = None    # set on each connection before it is served

    def __init__(self, server_address, handler):
        self.address_family = socket.AF_INET6 if ':' in server_address[0] \
            else socket.AF_INET
        self.slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(server_address, handler)

    def server_bind(self):
        # Not HTTPServer.server_bind: it looks the address up in the DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def refused(self, client_address):
        """A connection closed because ``max_connections`` are served."""

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.refused(client_address)
            self.shutdown_request(request)
            return
        if self.request_timeout is not None:
            request.settimeout(self.request_timeout)
        try:
            super().process_request(request, client_address)
        except Exception:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
