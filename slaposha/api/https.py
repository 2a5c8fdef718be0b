"""The agent's API over HTTPS with mutual TLS: port 1215 (``[api] port``),
on the host's address (``[api] listen``).

Every client shows a certificate of the cluster CA (``ssl.CERT_REQUIRED``:
no certificate, another CA's or an expired one ends the TLS handshake);
one that the cluster's revocation list (``crl.pem`` in ``ssl_dir``, read again
when it changes) names is refused with 403. The certificate's role
(:mod:`slaposha.pki`) decides what it may do of the agent's routes
(:mod:`slaposha.api.routes`, the same as on the unix socket).

The agent starts it beside the unix socket API::

    from slaposha.api.https import HttpsApi
    self.https_api = HttpsApi(self, self.cluster, self.host).start()
    ...
    self.https_api.stop()

When the cluster has no CA yet (no ``ca.crt`` in ``ssl_dir``) the API stays
off and says so in one log line.
"""

import logging
import os
import socket
import ssl
import threading

from slaposha import pki
from slaposha.api import ApiError
from slaposha.api.routes import AgentApi, Identity, RouteHandler
from slaposha.api.server import BoundedServer, limits_of
from slaposha.config import ConfigError
from slaposha.inputs import one_line

__all__ = ['HttpsApi', 'identify_peer', 'server_context']

logger = logging.getLogger(__name__)


def identify_peer(conn, revocations):
    """The Identity that the client certificate of ``conn`` (a TLS
    connection) shows; ApiError 403 when it is revoked or names no role,
    503 when the revocation list is unusable."""
    cert = conn.getpeercert()
    if not cert:  # CERT_REQUIRED makes this impossible; be sure
        raise ApiError(403, 'no client certificate')
    role, name = pki.role_from_peercert(cert)
    try:
        serial = int(cert.get('serialNumber', ''), 16)
    except ValueError:
        raise ApiError(403, 'client certificate without a serial number')
    try:
        revoked = revocations.is_revoked(serial)
    except pki.PkiError as e:
        logger.error('api: every client refused: %s', e)
        raise ApiError(503, 'the revocation list is unusable (%s): every'
                       ' certificate is refused until it is fixed' % e)
    if revoked:
        raise ApiError(403, 'the certificate of %s (serial %s) is revoked'
                       % (name, pki.serial_text(serial)))
    if role is None:
        raise ApiError(403, 'the certificate of %s names no slaposha role'
                       ' (a SAN URI %s<role>)' % (name, pki.ROLE_URI_PREFIX))
    if role == pki.HOST_ROLE:
        # A peer relays an operator's action: it names who.
        return Identity(role, name, serial, names_who_acts=True,
                        acts_as='host %s' % name)
    return Identity(role, name, serial, acts_as='%s %s' % (role, name))


def server_context(ca, cert, key):
    """The TLS side of a server that shows ``cert`` and requires client
    certificates of ``ca``; ssl.SSLError or OSError for unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


class _Server(BoundedServer):
    name = 'api'

    def serve_connection(self, request, client_address, slot):
        """The TLS handshake happens here, in the connection's thread, so
        that a slow or silent client never holds up the others; then the
        connection counts for the client's certificate."""
        where = '%s:%s' % client_address[:2]
        request.settimeout(max(slot.remaining(), 0.001))
        try:
            # Since Python 3.5, the timeout bounds the whole handshake.
            conn = self.api.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            logger.info('api: %s: TLS handshake refused: %s', where,
                        one_line(getattr(e, 'reason', None) or e))
            return
        try:
            refusal = None
            cert = conn.getpeercert() or {}
            if not slot.become(('certificate', cert.get('serialNumber'))):
                name = pki.role_from_peercert(cert)[1]
                logger.warning('api: %s (%s) refused: its certificate has'
                               ' %d connections open (the limit of one'
                               ' client)', name, where,
                               self.limits.max_client_connections)
                refusal = (429, 'the certificate of %s has %d connections'
                           ' open: the limit of one client' % (
                               name, self.limits.max_client_connections))
            self.RequestHandlerClass(conn, client_address, self, slot,
                                     refusal)
        except OSError as e:
            logger.debug('api: %s: %s', where, e)
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()


class HttpsApi(AgentApi):
    """The HTTPS API of ``agent`` (see :class:`AgentApi`), for ``host`` of
    ``cluster``. ``port`` and ``listen`` override ``[api]``; port 0 takes a
    free one (see :attr:`port`)."""

    def __init__(self, agent, cluster, host, port=None, listen=None):
        super().__init__(agent, cluster, host, logger)
        self.listen = listen or cluster.api.listen or \
            cluster.hosts[host].address
        self.port = cluster.api.port if port is None else port
        self.server = None
        self.context = None
        self.revocations = None
        self._thread = None

    # -- life cycle -----------------------------------------------------------

    def files(self):
        """(ca, cert, key, crl) paths in the cluster's ssl_dir."""
        d = self.cluster.ssl_dir
        return tuple(os.path.join(d, n) for n in (
            'ca.crt', self.host + '.crt', self.host + '.key', 'crl.pem'))

    def _context(self):
        ca, cert, key, crl = self.files()
        for path in (cert, key):
            if not os.access(path, os.R_OK):
                raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                                  '%s has a CA but %s is missing or'
                                  ' unreadable (slaposha cluster join)'
                                  % (self.cluster.ssl_dir, path))
        mode = os.stat(key).st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                              '%s: a private key readable by others (mode'
                              ' %o): chmod 600 it' % (key, mode))
        try:
            ca_cert = pki.load_cert(ca)
            ctx = server_context(ca, cert, key)
        except (pki.PkiError, ssl.SSLError, OSError) as e:
            raise ConfigError(self.cluster.path, 'cluster', 'ssl_dir',
                              'cannot use %s, %s and %s: %s'
                              % (ca, cert, key, one_line(e)))
        self.revocations = pki.Revocations(crl, ca_cert)
        return ctx

    def start(self):
        ca = self.files()[0]
        if not os.path.exists(ca):
            logger.warning('api: HTTPS API off: no cluster CA (%s); see'
                           ' `slaposha cluster init`', ca)
            return self
        self.context = self._context()
        self.load()
        try:
            self.server = _Server((self.listen, self.port), RouteHandler,
                                  limits_of(self.cluster.api))
        except OSError as e:
            raise ConfigError(self.cluster.path, 'api', 'port', 'cannot'
                              ' listen on %s port %d: %s' % (
                                  self.listen, self.port,
                                  e.strerror or e))
        self.server.api = self
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name='https-api', daemon=True)
        self._thread.start()
        self.feed.start('https-api-poll')
        logger.info('api: HTTPS on %s port %d (client certificates of %s)',
                    self.listen, self.port, ca)
        return self

    @property
    def url(self):
        if self.server is None:
            return None
        host = '[%s]' % self.listen if ':' in self.listen else self.listen
        return 'https://%s:%d' % (host, self.port)

    def stop(self):
        self.feed.stop()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    # -- who is asking --------------------------------------------------------

    def identify(self, conn):
        who = identify_peer(conn, self.revocations)
        if who.role == pki.HOST_ROLE and who.name not in self.cluster.members:
            raise ApiError(403, 'a host certificate for %r, which is not a'
                           ' host of this cluster' % who.name)
        return who
