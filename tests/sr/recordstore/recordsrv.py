"""recordstore's service: stores what it is sent, on the partition's own
addresses (from its .slapos-resource), port 8080.

    POST /records   body = one record; appended as one line and fsynced
                    before the answer "ok N" (N = records stored)
    GET /records    "records N", then every record, one per line
    GET /who        "recordstore PARTITION", the partition serving

Usage: recordsrv.py PARTITION_FOLDER
"""

import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = 8080
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def _answer(self, code, text):
        body = text.encode()
        self.send_response(code)
        self.send_header('Content-Type', 'text/plain')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == '/who':
            return self._answer(200, 'recordstore %s\n' % PARTITION)
        if self.path == '/records':
            with LOCK:
                try:
                    with open(RECORDS) as f:
                        text = f.read()
                except FileNotFoundError:
                    text = ''
                return self._answer(200, 'records %d\n%s' % (
                    text.count('\n'), text))
        self._answer(404, 'no such page\n')

    def do_POST(self):
        if self.path != '/records':
            return self._answer(404, 'no such page\n')
        size = int(self.headers.get('Content-Length') or 0)
        record = self.rfile.read(size).decode('utf-8', 'replace')
        record = record.replace('\n', ' ').strip()
        with LOCK:
            with open(RECORDS, 'a') as f:
                f.write(record + '\n')
                f.flush()
                os.fsync(f.fileno())
            global COUNT
            COUNT += 1
            n = COUNT
        self._answer(200, 'ok %d\n' % n)

    def log_message(self, *args):
        pass


class Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main(folder):
    global PARTITION, RECORDS, COUNT
    PARTITION = os.path.basename(os.path.normpath(folder))
    data = os.path.join(folder, 'srv', 'records')
    os.makedirs(data, exist_ok=True)
    RECORDS = os.path.join(data, 'records.log')
    try:
        with open(RECORDS) as f:
            COUNT = sum(1 for _ in f)
    except FileNotFoundError:
        COUNT = 0
    with open(os.path.join(folder, '.slapos-resource')) as f:
        addresses = [a['addr'] for a in json.load(f).get('address_list', [])]
    servers = []
    for addr in addresses:
        cls = Server6 if ':' in addr else ThreadingHTTPServer
        cls.allow_reuse_address = True
        servers.append(cls((addr, PORT), Handler))
    print('recordstore %s: %d records, serving on %s port %d' % (
        PARTITION, COUNT, ' '.join(addresses), PORT), flush=True)
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


if __name__ == '__main__':
    main(sys.argv[1])
