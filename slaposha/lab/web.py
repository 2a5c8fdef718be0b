"""A small web service for lab tests and benchmarks: an address, a bind
mount of the host's own data folder and an HTTP server on the address.

``prepare(lab, hosts)`` gives each host a data folder whose ``who`` file
names the host, so that a client can tell which host answered; ``fetch``
asks from a host outside the cluster.
"""

import os
import textwrap

__all__ = ['VIP', 'SERVICE', 'prepare', 'fetch', 'get']

VIP = '10.213.0.100'

SERVICE = '''
    [service]
    hosts = hA hB
    [ip#vip]
    address = %s/32
    dev = lab0
    [fs#data]
    device = /var/lib/slaposha/web-data
    type = bind
    mount_point = /srv/slapgrid/web
    [app#http]
    command = exec python3 -m http.server --bind %s 8080 --directory /srv/slapgrid/web
''' % (VIP, VIP)


def prepare(lab, hosts=('hA', 'hB')):
    """Each host's own data folder (``served by <host>``) and mount point."""
    for host in hosts:
        data = lab[host].path('/var/lib/slaposha') + '/web-data'
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, 'who'), 'w') as f:
            f.write('served by %s\n' % host)
        lab[host].run(['mkdir', '-p', '/srv/slapgrid/web'])


def get(lab, via, url, timeout=1, data=None):
    """The text ``url`` answers, asked from inside host ``via`` (a POST of
    ``data`` when given); None when nothing answers."""
    p = lab[via].run(['python3', '-c', textwrap.dedent('''
        import urllib.request
        data = %r
        try:
            print(urllib.request.urlopen(%r, timeout=%s, data=data and
                                         data.encode()).read().decode())
        except Exception:
            print("")
    ''' % (data, url, timeout))], check=False)
    return p.stdout.strip() or None


def fetch(lab, via='hO', timeout=1):
    """What the service answers at its address, seen from ``via``."""
    return get(lab, via, 'http://%s:8080/who' % VIP, timeout)
