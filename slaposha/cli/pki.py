"""``slaposha cluster init|join`` and ``slaposha cert ...``: the cluster's
PKI from the command line (see :mod:`slaposha.pki` for the files).

Keys never leave the machine that uses them: a host (or an operator) makes
its key and a request (``cert request``), the request goes to wherever the
CA key is (``cert sign``), the certificate comes back (``cert install``).
``cluster join`` does all three when the CA key is on the joining host.
"""

import json
import os

from slaposha.cli.commands import UserError, cluster_of, command


def _pki():
    from slaposha import pki
    return pki


def _run(func):
    """Turn PkiError into the CLI's one-line UserError."""
    def wrapper(args):
        pki = _pki()
        try:
            return func(args, pki)
        except pki.PkiError as e:
            raise UserError(str(e))
    wrapper.__name__ = func.__name__
    wrapper.__doc__ = func.__doc__
    return wrapper


def _host(args, cluster):
    from slaposha.daemon import default_host
    host = args.host or default_host()
    if host not in cluster.members:
        raise UserError('%s: this host is %r (--host, or the hostname), which'
                        ' is not one of the hosts or witnesses of [cluster]'
                        ' (%s)' % (cluster.path, host,
                                   ' '.join(cluster.members)))
    return host


def _ensure_dir(path, mode=0o755):
    try:
        os.makedirs(path, mode=mode, exist_ok=True)
    except OSError as e:
        raise UserError('cannot create %s: %s' % (path, e.strerror or e))
    return path


def _operator_dir(args):
    pki = _pki()
    return os.path.abspath(os.path.expanduser(args.dir or pki.OPERATOR_DIR))


def _ca(args, pki):
    """(CA key, CA certificate, ssl_dir or None) for the signing commands."""
    ssl_dir = None
    if not (args.ca_cert and args.ca_key):
        ssl_dir = cluster_of(args).ssl_dir
    ca_cert_path = args.ca_cert or os.path.join(ssl_dir, 'ca.crt')
    ca_key_path = args.ca_key or os.path.join(ssl_dir, 'ca.key')
    if not os.path.exists(ca_key_path):
        raise UserError('%s: no CA key here (give --ca-key where it is kept)'
                        % ca_key_path)
    ca_key = pki.load_key(ca_key_path)
    ca_cert = pki.load_cert(ca_cert_path)
    pki.check_key_matches(ca_cert, ca_key, '%s (the CA key)' % ca_key_path)
    return ca_key, ca_cert, ssl_dir


def _days(args):
    if args.days is not None and args.days < 1:
        raise UserError('--days must be at least 1 (got %d)' % args.days)
    return args.days


_HOST = (('--host',), dict(help='name of this host in the cluster file'
                                ' (default: the short hostname)'))
_CA_KEY = (('--ca-key',), dict(metavar='FILE', help='the CA key (default:'
                                   ' ca.key in the cluster ssl_dir)'))
_CA_CERT = (('--ca-cert',), dict(metavar='FILE', help='the CA certificate'
                                     ' (default: ca.crt in the cluster'
                                     ' ssl_dir)'))
_DAYS = (('--days',), dict(type=int, help='validity in days (default: %d'
                                          ' for hosts, %d for operators)'
                                          % (825, 365)))
_DIR = (('--dir',), dict(metavar='DIR', help='operator files folder'
                                             ' (default: ~/.slaposha)'))


def _host_files(ssl_dir, host):
    return (os.path.join(ssl_dir, host + '.key'),
            os.path.join(ssl_dir, host + '.crt'),
            os.path.join(ssl_dir, host + '.csr'))


@command('cluster init', 'create the cluster CA and this host\'s'
         ' certificate in the cluster ssl_dir', [
             _HOST,
             (('--ca-key',), dict(metavar='FILE', help='where to write the'
                                  ' CA key (default: ca.key in ssl_dir);'
                                  ' keep it off the hosts')),
             (('--days',), dict(type=int, help='validity of the host'
                                ' certificate in days (default 825)')),
         ])
@_run
def cluster_init(args, pki):
    cluster = cluster_of(args)
    host = _host(args, cluster)
    days = _days(args)
    ssl_dir = _ensure_dir(cluster.ssl_dir)
    ca_cert_path = os.path.join(ssl_dir, 'ca.crt')
    ca_key_path = os.path.abspath(args.ca_key or
                                  os.path.join(ssl_dir, 'ca.key'))
    for path in (ca_cert_path, ca_key_path):
        if os.path.exists(path):
            raise UserError('%s already exists: this cluster has a CA (other'
                            ' hosts use `slaposha cluster join`)' % path)
    key_path, cert_path, _ = _host_files(ssl_dir, host)
    if os.path.exists(key_path):
        raise UserError('%s already exists: not overwritten' % key_path)
    _ensure_dir(os.path.dirname(ca_key_path), 0o700)
    ca_key, ca_cert = pki.create_ca(cluster.name)
    pki.write_key(ca_key_path, ca_key)
    pki.write_cert(ca_cert_path, ca_cert, overwrite=False)
    pki.write_crl(os.path.join(ssl_dir, 'crl.pem'),
                  pki.empty_crl(ca_key, ca_cert))
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), host, pki.HOST_ROLE,
                     address=cluster.hosts[host].address, days=days)
    pki.write_key(key_path, key)
    pki.write_cert(cert_path, cert)
    print('cluster %s: CA %s (key %s), revocation list %s' % (
        cluster.name, ca_cert_path, ca_key_path,
        os.path.join(ssl_dir, 'crl.pem')))
    print('%s: certificate %s (serial %s), key %s' % (
        host, cert_path, pki.serial_text(cert.serial_number), key_path))
    print('next: copy the cluster file, ca.crt and crl.pem to the other'
          ' hosts and run `slaposha cluster join` there; keep %s off the'
          ' hosts (commands that sign take --ca-key)' % ca_key_path)
    return 0


@command('cluster join', 'give this host its key and certificate: signed'
         ' here when the CA key is here, else a request to sign elsewhere', [
             _HOST, _CA_KEY, _DAYS,
         ])
@_run
def cluster_join(args, pki):
    cluster = cluster_of(args)
    host = _host(args, cluster)
    days = _days(args)
    ssl_dir = cluster.ssl_dir
    ca_cert_path = os.path.join(ssl_dir, 'ca.crt')
    if not os.path.exists(ca_cert_path):
        raise UserError('%s: missing: copy ca.crt (and crl.pem) from a host'
                        ' of the cluster first' % ca_cert_path)
    ca_cert = pki.load_cert(ca_cert_path)
    key_path, cert_path, csr_path = _host_files(ssl_dir, host)
    if os.path.exists(cert_path):
        raise UserError('%s already exists: %s has joined' % (cert_path, host))
    ca_key_path = args.ca_key or os.path.join(ssl_dir, 'ca.key')
    key = _host_key(pki, key_path)
    if not os.path.exists(ca_key_path):
        csr = pki.make_csr(key, host)
        pki.write_csr(csr_path, csr)
        print('%s: key %s, request %s' % (host, key_path, csr_path))
        print('the CA key is not here: take %s to where it is, run `slaposha'
              ' cert sign %s --role host` there, bring the certificate back'
              ' and run `slaposha cert install <file>` here' % (
                  csr_path, os.path.basename(csr_path)))
        return 0
    ca_key = pki.load_key(ca_key_path)
    pki.check_key_matches(ca_cert, ca_key, '%s (the CA key)' % ca_key_path)
    cert = pki.issue(ca_key, ca_cert, key.public_key(), host, pki.HOST_ROLE,
                     address=cluster.hosts[host].address, days=days)
    pki.write_cert(cert_path, cert)
    print('%s: certificate %s (serial %s), key %s' % (
        host, cert_path, pki.serial_text(cert.serial_number), key_path))
    return 0


def _host_key(pki, key_path):
    """The existing key (a request again, or a renewal), or a new one."""
    if os.path.exists(key_path):
        return pki.load_key(key_path)
    key = pki.new_key()
    pki.write_key(key_path, key)
    return key


@command('cert request', 'make a key and a certificate request on this'
         ' machine (this host, or --operator NAME)', [
             _HOST,
             (('--operator',), dict(metavar='NAME', help='request an'
                                    ' operator certificate for NAME, in'
                                    ' --dir')),
             _DIR,
         ])
@_run
def cert_request(args, pki):
    if args.operator:
        if args.host:
            raise UserError('give --host or --operator, not both')
        name = pki.check_name(args.operator, 'operator name')
        folder = _ensure_dir(_operator_dir(args), 0o700)
        key_path = os.path.join(folder, 'operator.key')
        csr_path = os.path.join(folder, 'operator.csr')
        role = '--role operator (or guest, admin, root)'
    else:
        if args.dir:
            raise UserError('--dir is for --operator; a host\'s files go to'
                            ' the cluster ssl_dir')
        cluster = cluster_of(args)
        name = _host(args, cluster)
        folder = _ensure_dir(cluster.ssl_dir)
        key_path, _, csr_path = _host_files(folder, name)
        role = '--role host'
    existed = os.path.exists(key_path)
    key = _host_key(pki, key_path)
    pki.write_csr(csr_path, pki.make_csr(key, name))
    print('%s: %s key %s, request %s' % (
        name, 'existing' if existed else 'new', key_path, csr_path))
    print('next: `slaposha cert sign %s %s` where the CA key is, then'
          ' `slaposha cert install <certificate>%s` here' % (
              os.path.basename(csr_path), role,
              ' --dir %s' % folder if args.operator and args.dir else ''))
    return 0


@command('cert sign', 'sign a certificate request with the CA key', [
    (('csr',), dict(metavar='REQUEST', help='the request (.csr) to sign')),
    (('--role',), dict(required=True, help='host, root, admin, operator or'
                       ' guest; host needs the request\'s name to be a host'
                       ' of the cluster file')),
    (('--out',), dict(metavar='FILE', help='where to write the certificate'
                      ' (default: the request\'s name with .crt)')),
    _CA_KEY, _CA_CERT, _DAYS,
])
@_run
def cert_sign(args, pki):
    pki.check_role(args.role)
    days = _days(args)
    csr = pki.load_csr(args.csr)
    name = pki.csr_name(csr)
    address = None
    if args.role == pki.HOST_ROLE:
        cluster = cluster_of(args)
        if name not in cluster.members:
            raise UserError('%s: the request is for %r, not a host of the'
                            ' cluster (%s)' % (args.csr, name,
                                               ' '.join(cluster.members)))
        address = cluster.hosts[name].address
    ca_key, ca_cert, _ = _ca(args, pki)
    cert = pki.sign_csr(ca_key, ca_cert, csr, args.role, address=address,
                        days=days)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.csr)),
                                   name + '.crt')
    pki.write_cert(out, cert)
    print('%s: role %s, serial %s, valid until %s: %s' % (
        name, args.role, pki.serial_text(cert.serial_number),
        pki.not_after(cert).strftime('%Y-%m-%d'), out))
    return 0


@command('cert install', 'install a signed certificate beside its key (a'
         ' host certificate in ssl_dir, an operator\'s in --dir)', [
             (('cert',), dict(metavar='CERTIFICATE')),
             (('--ca',), dict(metavar='FILE', help='the cluster CA'
                              ' certificate to install with an operator'
                              ' certificate (default: the one in --dir)')),
             _DIR,
         ])
@_run
def cert_install(args, pki):
    cert = pki.load_cert(args.cert)
    role = pki.cert_role(cert)
    name = pki.cert_name(cert)
    if role is None:
        raise UserError('%s: no slaposha role in this certificate' % args.cert)
    if role == pki.HOST_ROLE:
        if args.dir or args.ca:
            raise UserError('%s is a host certificate: it goes to the cluster'
                            ' ssl_dir, with its ca.crt (no --dir, --ca)'
                            % args.cert)
        cluster = cluster_of(args)
        if name not in cluster.members:
            raise UserError('%s: for %r, not a host of the cluster (%s)' % (
                args.cert, name, ' '.join(cluster.members)))
        folder = cluster.ssl_dir
        ca_cert = pki.load_cert(os.path.join(folder, 'ca.crt'))
        key_path, cert_path, csr_path = _host_files(folder, name)
        ca_target = None
    else:
        folder = _ensure_dir(_operator_dir(args), 0o700)
        ca_source = args.ca or os.path.join(folder, 'ca.crt')
        if not os.path.exists(ca_source):
            raise UserError('%s: missing: give the cluster CA certificate'
                            ' with --ca' % ca_source)
        ca_cert = pki.load_cert(ca_source)
        key_path = os.path.join(folder, 'operator.key')
        cert_path = os.path.join(folder, 'operator.crt')
        csr_path = os.path.join(folder, 'operator.csr')
        ca_target = os.path.join(folder, 'ca.crt') if args.ca else None
    pki.check_issued_by(cert, ca_cert, args.cert)
    pki.check_key_matches(cert, pki.load_key(key_path),
                          '%s (key %s)' % (args.cert, key_path))
    if ca_target:
        pki.write_cert(ca_target, ca_cert)
    pki.write_cert(cert_path, cert)
    try:
        os.unlink(csr_path)
    except OSError:
        pass
    print('%s: role %s, serial %s: installed as %s' % (
        name, role, pki.serial_text(cert.serial_number), cert_path))
    return 0


@command('cert issue', 'make an operator key and certificate where the CA'
         ' key is (for an operator elsewhere: cert request, sign, install)', [
             (('name',), dict(help='the operator\'s name')),
             (('--role',), dict(required=True, help='root, admin, operator'
                                ' or guest')),
             _DIR, _CA_KEY, _CA_CERT, _DAYS,
             (('--force',), dict(action='store_true', help='replace the'
                                 ' files already in --dir')),
         ])
@_run
def cert_issue(args, pki):
    pki.check_name(args.name, 'operator name')
    pki.check_role(args.role, allow_host=False)
    days = _days(args)
    ca_key, ca_cert, _ = _ca(args, pki)
    folder = _ensure_dir(_operator_dir(args), 0o700)
    paths = [os.path.join(folder, n) for n in
             ('operator.key', 'operator.crt', 'ca.crt')]
    if not args.force:
        for path in paths[:2]:
            if os.path.exists(path):
                raise UserError('%s already exists (another --dir, or'
                                ' --force)' % path)
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), args.name, args.role,
                     days=days)
    pki.write_key(paths[0], key, overwrite=True)
    pki.write_cert(paths[1], cert)
    pki.write_cert(paths[2], ca_cert)
    print('%s: role %s, serial %s, valid until %s: %s' % (
        args.name, args.role, pki.serial_text(cert.serial_number),
        pki.not_after(cert).strftime('%Y-%m-%d'), ', '.join(paths)))
    return 0


@command('cert revoke', 'add a certificate to the cluster\'s revocation list'
         ' (crl.pem, signed by the CA)', [
             (('cert',), dict(metavar='CERTIFICATE|SERIAL',
                              help='a certificate file or its serial number'
                                   ' (hexadecimal, as cert show prints it)')),
             (('--crl',), dict(metavar='FILE', help='the revocation list'
                               ' (default: crl.pem in ssl_dir)')),
             _CA_KEY, _CA_CERT,
         ])
@_run
def cert_revoke(args, pki):
    if os.path.exists(args.cert):
        cert = pki.load_cert(args.cert)
        serial = cert.serial_number
        who = '%s (%s)' % (pki.cert_name(cert), pki.cert_role(cert))
    else:
        serial = pki.parse_serial(args.cert)
        who = 'serial'
    ca_key, ca_cert, ssl_dir = _ca(args, pki)
    if args.crl:
        crl_path = args.crl
    elif ssl_dir is not None:
        crl_path = os.path.join(ssl_dir, 'crl.pem')
    else:
        crl_path = os.path.join(os.path.dirname(os.path.abspath(
            args.ca_cert)), 'crl.pem')
    added = pki.revoke(ca_key, ca_cert, crl_path, [serial])
    print('%s %s: %s in %s; copy it to the ssl_dir of every host (agents'
          ' read it again when it changes)' % (
              who, pki.serial_text(serial),
              'revoked' if added else 'already revoked', crl_path))
    return 0


@command('cert show', 'print a certificate\'s name, role, serial and'
         ' validity', [
             (('cert',), dict(metavar='CERTIFICATE')),
             (('--json',), dict(action='store_true')),
         ])
@_run
def cert_show(args, pki):
    facts = pki.describe(pki.load_cert(args.cert))
    if args.json:
        print(json.dumps(facts, sort_keys=True))
    else:
        print('%(name)s: role %(role)s, serial %(serial)s, valid'
              ' %(not_before)s to %(not_after)s%(state)s, issuer %(issuer)s'
              % dict(facts, state=' (EXPIRED)' if facts['expired'] else ''))
    return 0
