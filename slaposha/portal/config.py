"""The portal file: the portal itself and the clusters it shows.

In the ini style of the cluster file (:mod:`slaposha.config`, whose key
types, parsing and one-line errors it uses)::

    [portal]
    listen = 10.0.0.9
    ssl_dir = /etc/opt/slaposha/portal      # ca.crt, portal.crt, portal.key

    [cluster paris]
    site = paris
    endpoints = https://10.0.1.1:1215 https://10.0.1.2:1215
    cert_dir = /etc/opt/slaposha/portal/paris   # operator.crt, .key, ca.crt

Besides the keys, :func:`load_portal` checks the files: every key mode 0600
and matching its certificate, each cluster certificate issued by that
cluster's CA with a role other than ``host``, and no CA key anywhere the
portal reads (it never holds one).
"""

import os
from collections import OrderedDict

from slaposha import pki
from slaposha.config import (ConfigError, _parse_ini, _parse_section,
                             describe_sections)
from slaposha.schema import REQUIRED, Key, key_table, parse_name

__all__ = ['PORTAL_SCHEMA', 'PortalConfig', 'load_portal', 'describe',
           'DEFAULT_PORTAL_FILE', 'CLUSTER_FILES', 'PORTAL_FILES']

DEFAULT_PORTAL_FILE = '/etc/opt/slaposha/portal.cfg'

# What `slaposha cert issue --dir` leaves, per cluster.
CLUSTER_FILES = ('operator.crt', 'operator.key', 'ca.crt')
# The portal's own: its CA (whose certificates may use it), its server
# certificate and key, and the revocation list of its CA (optional).
PORTAL_FILES = ('ca.crt', 'portal.crt', 'portal.key', 'crl.pem')

PORTAL_SCHEMA = OrderedDict([
    ('portal', key_table(
        Key('name', 'string', 'slaposha portal', 'title of the portal\'s'
            ' page'),
        Key('listen', 'address', '127.0.0.1', 'address the portal serves'
            ' HTTPS on (its certificate names it)'),
        Key('port', 'integer', 1216, 'HTTPS port of the portal', minimum=1,
            maximum=65535),
        Key('ssl_dir', 'path', None, 'the portal CA certificate (ca.crt:'
            ' only its certificates may use the portal), the portal\'s'
            ' certificate and key (portal.crt, portal.key) and its'
            ' revocation list (crl.pem); default: portal/ beside this file'),
        Key('poll_interval', 'duration', 2.0, 'how often the portal asks'
            ' each agent of each cluster for its own view (standby'
            ' freshness, whether it answers)', minimum=0.1),
        Key('request_timeout', 'duration', 3.0, 'time allowed to one read'
            ' of an agent\'s API; a cluster none of whose agents answers'
            ' within it is shown unreachable', minimum=0.1),
        Key('stream_timeout', 'duration', 20.0, 'an event stream silent'
            ' this long is given up for the next agent (agents send a'
            ' keepalive every 15 s)', minimum=1.0),
        Key('retry_interval', 'duration', 2.0, 'wait before trying again'
            ' the agents of a cluster that none answered', minimum=0.1),
        Key('action_timeout', 'duration', 10.0, 'time allowed to an'
            ' operator\'s action on a cluster (agents give etcd 5 s)',
            minimum=0.5),
        Key('history_kept', 'integer', 20, 'takeovers and switches of each'
            ' cluster shown', minimum=1, maximum=1000),
        Key('keepalive', 'duration', 15.0, 'a comment on the portal\'s idle'
            ' event streams this often (a browser gone is found then)',
            minimum=1.0),
        Key('max_connections', 'integer', 64, 'connections served at once;'
            ' more are closed at once', minimum=4, maximum=4096),
        Key('max_client_connections', 'integer', 16, 'connections one'
            ' client may hold at once (by address during the TLS handshake,'
            ' then by certificate; beyond: 429): a browser opens up to six'
            ' per page', minimum=1, maximum=4096),
        Key('client_timeout', 'duration', 10.0, 'time a browser has to send'
            ' its whole request (TLS handshake included), however it'
            ' trickles; past it, 408', minimum=0.1, maximum=3600),
    )),
    ('cluster', key_table(
        Key('site', 'string', None, 'where the cluster is, to filter by'),
        Key('endpoints', 'urls', REQUIRED, 'HTTPS API URLs of its agents'
            ' (https://<host address>:1215), tried in this order'),
        Key('cert_dir', 'path', REQUIRED, 'the certificate the portal shows'
            ' there, its key and that cluster\'s CA certificate'
            ' (operator.crt, operator.key, ca.crt, as `slaposha cert issue'
            ' --dir` leaves them); its role bounds what the portal may do'),
    )),
])

_NAMED = ('cluster',)


class PortalConfig(object):
    """``portal`` (a Section) and ``clusters`` ({label: Section}, in file
    order), each cluster with ``name`` and its files ``cert``, ``key``,
    ``ca``."""

    def __init__(self, path, portal, clusters):
        self.path = path
        self.portal = portal
        self.clusters = clusters

    @property
    def ssl_dir(self):
        return self.portal.ssl_dir or os.path.join(
            os.path.dirname(os.path.abspath(self.path)), 'portal')

    def files(self):
        """(ca, cert, key, crl) of the portal itself."""
        return tuple(os.path.join(self.ssl_dir, n) for n in PORTAL_FILES)


def load_portal(path=None, check_files=True):
    """Parse and validate a portal file; ConfigError on any mistake. With
    ``check_files``, the certificates and keys it names too."""
    path = path or os.environ.get('SLAPOSHA_PORTAL_CONFIG') or \
        DEFAULT_PORTAL_FILE
    parser = _parse_ini(path)
    portal = None
    clusters = OrderedDict()
    for section in parser.sections():
        kind, _, label = section.partition(' ')
        label = label.strip()
        raw = dict(parser[section])
        if kind == 'portal' and not label:
            portal = _parse_section(path, section, raw,
                                    PORTAL_SCHEMA['portal'])
        elif kind == 'cluster' and label:
            try:
                label = parse_name(label)
            except ValueError as e:
                raise ConfigError(path, section, message='section name: %s'
                                  % e)
            clusters[label] = _parse_section(path, section, raw,
                                             PORTAL_SCHEMA['cluster'])
            clusters[label].name = label
            clusters[label].site = clusters[label].site or ''
        else:
            raise ConfigError(path, section, message='unknown section'
                              ' (known: [portal], [cluster <name>])')
    if portal is None:
        portal = _parse_section(path, 'portal', {}, PORTAL_SCHEMA['portal'])
    if not clusters:
        raise ConfigError(path, message='no [cluster <name>] section: the'
                          ' portal has nothing to show')
    config = PortalConfig(path, portal, clusters)
    _check_endpoints(config)
    for label, cluster in clusters.items():
        cluster.cert, cluster.key, cluster.ca = (
            os.path.join(cluster.cert_dir, n) for n in CLUSTER_FILES)
    if check_files:
        check_portal_files(config)
        for cluster in clusters.values():
            check_cluster_files(config, cluster)
    return config


def _check_endpoints(config):
    seen = {}
    for label, cluster in config.clusters.items():
        section = 'cluster %s' % label
        for url in cluster.endpoints:
            if not url.startswith('https://'):
                raise ConfigError(config.path, section, 'endpoints', '%s:'
                                  ' the agents\' API is HTTPS only' % url)
            if url in seen:
                raise ConfigError(config.path, section, 'endpoints', '%s is'
                                  ' also an endpoint of cluster %s'
                                  % (url, seen[url]))
            seen[url] = label


def _no_ca_key(config, section, key, folder):
    """The portal never holds a CA key: refuse to run beside one."""
    found = os.path.join(folder, 'ca.key')
    if os.path.exists(found):
        raise ConfigError(config.path, section, key, '%s: a CA key where the'
                          ' portal reads its files; the portal never holds'
                          ' one: move it off this machine' % found)


def _key_pair(config, section, key, cert_path, key_path, what):
    """The certificate and its key, checked: readable, key mode 0600,
    matching, not a CA's. Returns the certificate."""
    try:
        mode = os.stat(key_path).st_mode & 0o777
    except OSError as e:
        raise ConfigError(config.path, section, key, '%s: %s (%s)' % (
            key_path, e.strerror or e, what))
    if mode & 0o077:
        raise ConfigError(config.path, section, key, '%s: a private key'
                          ' readable by others (mode %o): chmod 600 it'
                          % (key_path, mode))
    try:
        cert = pki.load_cert(cert_path)
        pki.check_key_matches(cert, pki.load_key(key_path),
                              '%s (key %s)' % (cert_path, key_path))
    except pki.PkiError as e:
        raise ConfigError(config.path, section, key, str(e))
    if pki.is_ca(cert):
        raise ConfigError(config.path, section, key, '%s is a CA'
                          ' certificate: the portal never holds a CA key;'
                          ' give it %s' % (cert_path, what))
    return cert


def check_portal_files(config):
    section, key = 'portal', 'ssl_dir'
    ca, cert, private, _ = config.files()
    _no_ca_key(config, section, key, config.ssl_dir)
    if not os.path.exists(ca):
        raise ConfigError(config.path, section, key, '%s: missing: the'
                          ' portal CA certificate (`slaposha portal init`)'
                          % ca)
    try:
        ca_cert = pki.load_cert(ca)
    except pki.PkiError as e:
        raise ConfigError(config.path, section, key, str(e))
    served = _key_pair(config, section, key, cert, private,
                       'its own server certificate')
    try:
        pki.check_issued_by(served, ca_cert, cert)
    except pki.PkiError as e:
        raise ConfigError(config.path, section, key, str(e))


def check_cluster_files(config, cluster):
    section, key = 'cluster %s' % cluster.name, 'cert_dir'
    _no_ca_key(config, section, key, cluster.cert_dir)
    cert = _key_pair(config, section, key, cluster.cert, cluster.key,
                     'an operator certificate of that cluster')
    try:
        ca_cert = pki.load_cert(cluster.ca)
        pki.check_issued_by(cert, ca_cert, cluster.cert)
    except pki.PkiError as e:
        raise ConfigError(config.path, section, key, str(e))
    role = pki.cert_role(cert)
    if role is None or role == pki.HOST_ROLE:
        raise ConfigError(config.path, section, key, '%s has role %s: give'
                          ' the portal an operator\'s certificate (role'
                          ' operator to act, guest to only read)'
                          % (cluster.cert, role or 'none'))
    cluster.role = role


def describe():
    """The portal file's keys, one per line, for ``slaposha config keys``."""
    return '\n'.join(['# portal file (%s)' % DEFAULT_PORTAL_FILE] +
                     describe_sections(PORTAL_SCHEMA, _NAMED))
