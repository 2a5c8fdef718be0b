"""The cluster's PKI: one CA, a certificate per host and per operator, and a
revocation list (an X.509 CRL signed by the CA).

Files, in the cluster's ``ssl_dir`` (``[cluster] ssl_dir``, default ``ssl/``
beside the cluster file) of every host:

- ``ca.crt``: the cluster CA certificate (public, the same everywhere);
- ``<host>.crt`` and ``<host>.key``: this host's certificate and key (mode
  0600; the key is created on the host and never leaves it);
- ``crl.pem``: the revoked certificates, signed by the CA (the same
  everywhere; an agent reads it again when the file changes);
- ``ca.key``: the CA key, only where certificates are signed. ``slaposha
  cluster init`` writes it there (or to ``--ca-key``); it can then move to
  an operator's machine or offline storage, and every command that signs
  takes ``--ca-key``.

Operators keep ``operator.key``, ``operator.crt`` and ``ca.crt`` in
``~/.slaposha`` (:data:`OPERATOR_DIR`).

A certificate says who it belongs to in its common name (a host name or an
operator name) and what it may do in a subject alternative name URI
``slaposha:role=<role>``: ``host`` for a cluster host, else one of
:data:`ROLES` (the subject's OU repeats it for people; slaposha reads only
the URI). Host certificates also name the host's address (an IP SAN) and
its name (a DNS SAN), and serve both TLS ends (serverAuth and clientAuth);
operator certificates are client certificates only.

Keys are EC P-256, written atomically with mode 0600.
"""

import datetime
import os
import re
import threading

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    'PkiError', 'ROLES', 'HOST_ROLE', 'ROLE_URI_PREFIX', 'OPERATOR_DIR',
    'new_key', 'create_ca', 'issue', 'make_csr', 'sign_csr', 'empty_crl',
    'revoke', 'Revocations', 'cert_role', 'cert_name', 'check_issued_by',
    'check_key_matches', 'write_file', 'write_key', 'write_cert',
    'load_key', 'load_cert', 'load_csr', 'load_crl', 'serial_text',
    'role_from_peercert', 'describe', 'is_ca',
]

# Roles of operators, most powerful first; hosts have the role HOST_ROLE.
ROLES = ('root', 'admin', 'operator', 'guest')
HOST_ROLE = 'host'
ROLE_URI_PREFIX = 'slaposha:role='

OPERATOR_DIR = os.path.join('~', '.slaposha')

CA_DAYS = 3650
HOST_DAYS = 825
OPERATOR_DAYS = 365

_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$')


class PkiError(Exception):
    """A PKI problem, as one line that names the file concerned."""


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _utc(value):
    return value if value.tzinfo else value.replace(
        tzinfo=datetime.timezone.utc)


def not_after(cert):
    return _utc(getattr(cert, 'not_valid_after_utc', None)
                or cert.not_valid_after)


def not_before(cert):
    return _utc(getattr(cert, 'not_valid_before_utc', None)
                or cert.not_valid_before)


def check_name(name, what='name'):
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PkiError('%s %r: expected letters, digits, ".", "_", "-" or'
                       ' "@", at most 63' % (what, name))
    return name


def check_role(role, allow_host=True):
    allowed = ROLES + ((HOST_ROLE,) if allow_host else ())
    if role not in allowed:
        raise PkiError('unknown role %r (roles: %s)'
                       % (role, ', '.join(allowed)))
    return role


# -- files -------------------------------------------------------------------

def write_file(path, data, mode=0o644, overwrite=True):
    """Write ``data`` (bytes) to ``path`` atomically with exactly ``mode``:
    a temporary file beside it, flushed to disk, then renamed."""
    path = os.path.abspath(path)
    if not overwrite and os.path.lexists(path):
        raise PkiError('%s already exists: not overwritten' % path)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, '.%s.%d.tmp' % (os.path.basename(path),
                                                os.getpid()))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
    except FileExistsError:
        os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o600)
    except OSError as e:
        raise PkiError('cannot write %s: %s' % (path, e.strerror or e))
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PkiError('cannot write %s: %s' % (path, e.strerror or e))
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_key(path, key, overwrite=False):
    """A private key, PEM, mode 0600, never over an existing file unless
    ``overwrite``."""
    data = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    return write_file(path, data, 0o600, overwrite=overwrite)


def write_cert(path, cert, overwrite=True):
    return write_file(path, cert.public_bytes(serialization.Encoding.PEM),
                      0o644, overwrite=overwrite)


def write_csr(path, csr, overwrite=True):
    return write_file(path, csr.public_bytes(serialization.Encoding.PEM),
                      0o644, overwrite=overwrite)


def write_crl(path, crl):
    return write_file(path, crl.public_bytes(serialization.Encoding.PEM),
                      0o644)


def _read(path, what):
    try:
        with open(path, 'rb') as f:
            return f.read()
    except FileNotFoundError:
        raise PkiError('%s: no such file (%s)' % (path, what))
    except OSError as e:
        raise PkiError('%s: cannot read (%s): %s'
                       % (path, what, e.strerror or e))


def load_key(path):
    data = _read(path, 'a private key')
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise PkiError('%s: not an unencrypted PEM private key (%s)'
                       % (path, e))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError('%s: not an EC private key' % path)
    return key


def load_cert(path):
    data = _read(path, 'a certificate')
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PkiError('%s: not a PEM certificate (%s)' % (path, e))


def load_csr(path):
    data = _read(path, 'a certificate request')
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise PkiError('%s: not a PEM certificate request (%s)' % (path, e))


def load_crl(path):
    data = _read(path, 'a revocation list')
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise PkiError('%s: not a PEM revocation list (%s)' % (path, e))


# -- keys and certificates ----------------------------------------------------

def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _ski(public_key):
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def create_ca(cluster_name, days=CA_DAYS, key=None):
    """(key, certificate) of a new cluster CA."""
    key = key or new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'slaposha'),
        x509.NameAttribute(NameOID.COMMON_NAME,
                           'slaposha %s CA' % cluster_name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(_ski(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, public_key, name, role, address=None, days=None,
          valid_from=None):
    """A certificate for ``public_key``: common name ``name`` and role
    ``role`` (``host`` needs ``address``, the host's IP address).

    ``valid_from`` (a datetime) back-dates the certificate; tests use it to
    make expired ones."""
    check_name(name)
    check_role(role)
    if role == HOST_ROLE and not address:
        raise PkiError('a host certificate needs the host address')
    if days is None:
        days = HOST_DAYS if role == HOST_ROLE else OPERATOR_DAYS
    start = valid_from or (_now() - datetime.timedelta(minutes=5))
    end = start + datetime.timedelta(days=days)
    ca_end = not_after(ca_cert)
    if end > ca_end:
        end = ca_end
    sans = [x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == HOST_ROLE:
        import ipaddress
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise PkiError('host address %r: not an IP address' % address)
        sans = [x509.DNSName(name), x509.IPAddress(ip)] + sans
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'slaposha'),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=False,
                                                    path_length=None),
                              critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=True, content_commitment=False,
                   key_encipherment=False, data_encipherment=False,
                   key_agreement=False, key_cert_sign=False, crl_sign=False,
                   encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.SubjectAlternativeName(sans),
                              critical=False)
               .add_extension(_ski(public_key), critical=False)
               .add_extension(
                   x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
    return builder.sign(ca_key, hashes.SHA256())


def make_csr(key, name):
    """A certificate request carrying only the public key and the name: the
    signer decides the role and the address."""
    check_name(name)
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256()))


def csr_name(csr):
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise PkiError('the request has %d common names, expected one'
                       % len(names))
    return check_name(names[0].value, 'common name of the request')


def sign_csr(ca_key, ca_cert, csr, role, address=None, days=None):
    """Sign a request after checking it is signed by its own key. Only the
    request's public key and common name are used; nothing else it asks for
    (extensions) is copied."""
    if not csr.is_signature_valid:
        raise PkiError('the request is not signed by its own key')
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise PkiError('the request is not for an EC key')
    return issue(ca_key, ca_cert, csr.public_key(), csr_name(csr), role,
                 address=address, days=days)


def cert_name(cert):
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value if names else None


def is_ca(cert):
    """True for a certificate that may sign others (a CA's)."""
    try:
        return cert.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def cert_role(cert):
    """The role the certificate's SAN URI names, or None."""
    try:
        san = cert.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    roles = [u[len(ROLE_URI_PREFIX):]
             for u in san.get_values_for_type(x509.UniformResourceIdentifier)
             if u.startswith(ROLE_URI_PREFIX)]
    if len(roles) != 1 or roles[0] not in ROLES + (HOST_ROLE,):
        return None
    return roles[0]


def role_from_peercert(peercert):
    """(role or None, common name or None) from ``ssl.getpeercert()``."""
    name = None
    for rdn in peercert.get('subject', ()):
        for key, value in rdn:
            if key == 'commonName':
                name = value
    roles = [value[len(ROLE_URI_PREFIX):]
             for kind, value in peercert.get('subjectAltName', ())
             if kind == 'URI' and value.startswith(ROLE_URI_PREFIX)]
    if len(roles) != 1 or roles[0] not in ROLES + (HOST_ROLE,):
        return None, name
    return roles[0], name


def serial_text(serial):
    return '%X' % serial


def parse_serial(text):
    cleaned = text.strip().replace(':', '')
    if cleaned.lower().startswith('0x'):
        cleaned = cleaned[2:]
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise PkiError('%r is neither a certificate file nor a serial number'
                       ' (hexadecimal)' % text)
    if value <= 0:
        raise PkiError('serial number %r must be positive' % text)
    return value


def check_issued_by(cert, ca_cert, what='certificate'):
    """Raise PkiError unless ``cert`` was signed by ``ca_cert``."""
    if cert.issuer != ca_cert.subject:
        raise PkiError('%s was issued by %s, not by this cluster\'s CA (%s)'
                       % (what, cert.issuer.rfc4514_string(),
                          ca_cert.subject.rfc4514_string()))
    try:
        ca_cert.public_key().verify(
            cert.signature, cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm))
    except (InvalidSignature, TypeError, ValueError):
        raise PkiError('%s is not signed by this cluster\'s CA' % what)


def check_key_matches(cert, key, what='certificate'):
    def raw(public):
        return public.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo)
    if raw(cert.public_key()) != raw(key.public_key()):
        raise PkiError('%s is not for this key' % what)


def describe(cert):
    """Facts about a certificate, JSON-able."""
    return {
        'name': cert_name(cert), 'role': cert_role(cert),
        'serial': serial_text(cert.serial_number),
        'issuer': cert.issuer.rfc4514_string(),
        'not_before': not_before(cert).isoformat(),
        'not_after': not_after(cert).isoformat(),
        'expired': not_after(cert) < _now(),
    }


# -- revocation ---------------------------------------------------------------

def empty_crl(ca_key, ca_cert):
    return _build_crl(ca_key, ca_cert, [])


def _build_crl(ca_key, ca_cert, revoked):
    now = _now()
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               # Hosts get the list by copy, not from a distribution point:
               # slaposha does not treat it as stale after next_update.
               .next_update(now + datetime.timedelta(days=CA_DAYS)))
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256())


def _check_crl(crl, ca_cert, path):
    if crl.issuer != ca_cert.subject or \
            not crl.is_signature_valid(ca_cert.public_key()):
        raise PkiError('%s: revocation list not signed by this cluster\'s CA'
                       % path)


def revoke(ca_key, ca_cert, crl_path, serials):
    """Add ``serials`` to the CRL at ``crl_path`` (created when missing) and
    sign it again. Returns the serials that were not already revoked."""
    entries = []
    known = set()
    if os.path.exists(crl_path):
        crl = load_crl(crl_path)
        _check_crl(crl, ca_cert, crl_path)
        for entry in crl:
            entries.append(entry)
            known.add(entry.serial_number)
    added = []
    for serial in serials:
        if serial in known:
            continue
        known.add(serial)
        added.append(serial)
        entries.append(x509.RevokedCertificateBuilder()
                       .serial_number(serial)
                       .revocation_date(_now()).build())
    write_crl(crl_path, _build_crl(ca_key, ca_cert, entries))
    return added


class Revocations(object):
    """The revoked serial numbers of ``crl_path``, read again whenever the
    file changes. No file: nothing is revoked. A file that cannot be read or
    is not signed by the CA makes :meth:`check` raise PkiError (fail closed).
    """

    def __init__(self, crl_path, ca_cert):
        self.path = crl_path
        self.ca_cert = ca_cert
        self._lock = threading.Lock()
        self._stamp = None
        self._serials = frozenset()
        self._problem = None

    def _load(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._stamp, self._serials, self._problem = None, frozenset(), None
            return
        except OSError as e:
            self._stamp = None
            self._problem = '%s: %s' % (self.path, e.strerror or e)
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            crl = load_crl(self.path)
            _check_crl(crl, self.ca_cert, self.path)
            self._serials = frozenset(e.serial_number for e in crl)
            self._problem = None
        except PkiError as e:
            self._problem = str(e)
        self._stamp = stamp

    def serials(self):
        with self._lock:
            self._load()
            if self._problem:
                raise PkiError(self._problem)
            return self._serials

    def is_revoked(self, serial):
        return serial in self.serials()
