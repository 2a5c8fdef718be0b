"""An operator's requests to the HTTPS API while guests trickle theirs
(issue 18: a client that sends a header byte every half second must not
hold a slot; clients sharing a guest certificate must not lock operators
out); and what the bounded JSON parser costs.

The API is the real one (slaposha.api.https.HttpsApi, mutual TLS, a PKI
made for the run) in front of a stand-in agent that answers a fixed status
(what is measured is the server, not the agent). ``--guests`` TLS clients
with one guest certificate each send a byte of their request every half
second; an operator sends GET /status every ``--every`` seconds for
``--seconds`` and counts answers, refusals and latencies. Then each guest's
fate: answered 429 at once (over max_client_connections), 408 at the
deadline (request_timeout), or still held at the end.

    .venv/bin/python benchmarks/api_limits.py [--guests 64] [--seconds 15]
"""

import argparse
import json
import os
import platform
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import requests  # noqa: E402

from slaposha import config, pki  # noqa: E402
from slaposha.api.https import HttpsApi  # noqa: E402

# One host is enough: what is measured is its API.
CLUSTER = """\
[cluster]
name = bench
hosts = hA
ssl_dir = {ssl}
[host hA]
address = 127.0.0.1
[api]
{extra}
"""


class StandIn(object):
    host = 'hA'
    decision_log = []

    def local_status(self):
        return {'host': 'hA', 'time': time.time(), 'etcd': 'ok',
                'lease': {'valid': True}, 'services': {'web': {
                    'state': 'running', 'owner': 'hA', 'token': 7}}}

    def cluster_status(self):
        return {'cluster': 'bench', 'host': 'hA', 'etcd': 'ok',
                'local': self.local_status(), 'services': {}}


def pair(folder, ca_key, ca_cert, name, role):
    key = pki.new_key()
    pki.write_key(os.path.join(folder, name + '.key'), key)
    pki.write_cert(os.path.join(folder, name + '.crt'), pki.issue(
        ca_key, ca_cert, key.public_key(), name, role,
        address='127.0.0.1' if role == 'host' else None))
    return os.path.join(folder, name + '.crt'), \
        os.path.join(folder, name + '.key')


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values \
        else float('nan')


def flood(args, folder):
    ssl_dir = os.path.join(folder, 'ssl')
    os.makedirs(ssl_dir)
    ca_key, ca_cert = pki.create_ca('bench')
    ca = pki.write_cert(os.path.join(ssl_dir, 'ca.crt'), ca_cert)
    pair(ssl_dir, ca_key, ca_cert, 'hA', 'host')
    guest = pair(folder, ca_key, ca_cert, 'guest', 'guest')
    operator = pair(folder, ca_key, ca_cert, 'operator', 'operator')
    path = os.path.join(folder, 'cluster.cfg')
    extra = 'request_timeout = %s\n' % args.request_timeout \
        if args.request_timeout else ''
    with open(path, 'w') as f:
        f.write(CLUSTER.format(ssl=ssl_dir, extra=extra))
    cluster = config.load_cluster(path)
    api = HttpsApi(StandIn(), cluster, 'hA', port=0).start()
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(*guest)
    stop = threading.Event()
    fates = {}

    def trickle(i):
        began = time.monotonic()
        try:
            raw = socket.create_connection(('127.0.0.1', api.port), 10)
            tls = ctx.wrap_socket(raw, server_hostname='127.0.0.1')
        except OSError as e:
            fates[i] = ('refused at connection', time.monotonic() - began,
                        type(e).__name__)
            return
        line = b'GET /status HTTP/1.0\r\nX-Slow: ' + b'a' * 10000
        tls.settimeout(0.5)
        for byte in line:
            if stop.is_set():
                fates[i] = ('held to the end', time.monotonic() - began, '')
                break
            try:
                tls.sendall(bytes([byte]))
                answer = tls.recv(200)
            except socket.timeout:
                continue
            except OSError as e:
                fates[i] = ('cut', time.monotonic() - began,
                            type(e).__name__)
                break
            status = answer.split(b' ', 2)[1].decode() if answer else 'EOF'
            fates[i] = (status, time.monotonic() - began, '')
            break
        tls.close()

    threads = [threading.Thread(target=trickle, args=(i,), daemon=True)
               for i in range(args.guests)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)   # every guest connected (or refused)
    latencies, failures = [], []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        began = time.monotonic()
        try:   # a new connection each time, as a CLI call
            r = requests.get(api.url + '/status', cert=operator, verify=ca,
                             timeout=30)
            if r.status_code == 200:
                latencies.append(time.monotonic() - began)
            else:
                failures.append(str(r.status_code))
        except requests.RequestException as e:
            failures.append(type(e).__name__)
        time.sleep(args.every)
    stop.set()
    for thread in threads:
        thread.join(15)
    api.stop()
    counts = {}
    for status, seconds, _ in fates.values():
        counts.setdefault(status, []).append(seconds)
    return latencies, failures, counts, cluster.api


def parse_cost():
    """Seconds per parse of a status-sized and a large facts-sized JSON
    text, json.loads against inputs.loads (its depth check); none before
    slaposha.inputs existed."""
    try:
        from slaposha.inputs import loads
    except ImportError:
        return []
    status = json.dumps({'services': {'s%d' % i: {
        'state': 'running', 'owner': 'hA', 'token': i, 'resources': [
            ['app#main', 'up', '1 process(es)']] * 5,
        'on': {h: {'decision': [time.time(), 'standby', 'hA owns it']}
               for h in ('hA', 'hB', 'hC')}} for i in range(20)}})
    facts = json.dumps({'software': ['/opt/slapgrid/%032x' % i
                                     for i in range(2000)],
                        'partitions': {'slappart%d' % i: {
                            'uid': 1000 + i, 'paths': ['/srv/%d' % i] * 10}
                            for i in range(500)}})
    rows = []
    for name, text in (('status', status), ('facts', facts)):
        n = 2000 if len(text) < 100000 else 50
        plain = timeit.timeit(lambda: json.loads(text), number=n) / n
        bounded = timeit.timeit(lambda: loads(text, 1 << 22, require=None),
                                number=n) / n
        rows.append((name, len(text), plain, bounded))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--guests', type=int, default=64)
    parser.add_argument('--seconds', type=float, default=15.0)
    parser.add_argument('--every', type=float, default=0.2)
    parser.add_argument('--request-timeout', default=None,
                        help='[api] request_timeout (default: the key\'s)')
    args = parser.parse_args()
    print('machine: %s, %d cores, Python %s' % (
        platform.platform(), os.cpu_count(), platform.python_version()))
    with tempfile.TemporaryDirectory(prefix='slaposha-bench-') as folder:
        latencies, failures, counts, api = flood(args, folder)
    print('api: max_connections %s, max_client_connections %s,'
          ' request_timeout %s' % (
              getattr(api, 'max_connections', '(none)'),
              getattr(api, 'max_client_connections', '(none)'),
              getattr(api, 'request_timeout', '(none)')))
    total = len(latencies) + len(failures)
    print('operator: %d of %d GET /status answered 200 while %d guests'
          ' trickled; latency p50 %.3f s, p99 %.3f s, max %.3f s; failures:'
          ' %s' % (len(latencies), total, args.guests,
                   percentile(latencies, 0.5), percentile(latencies, 0.99),
                   max(latencies or [float('nan')]),
                   ', '.join(sorted(set(failures))) or 'none'))
    for status, seconds in sorted(counts.items()):
        print('guests %s: %d (after %.1f s median, %.1f s max)' % (
            status, len(seconds), statistics.median(seconds), max(seconds)))
    for name, size, plain, bounded in parse_cost():
        print('parse %s (%d bytes): json.loads %.1f us, inputs.loads %.1f'
              ' us' % (name, size, plain * 1e6, bounded * 1e6))


if __name__ == '__main__':
    main()
