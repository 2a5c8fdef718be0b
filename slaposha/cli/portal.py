"""``slaposha portal serve|init|check``: the portal of many clusters
(:mod:`slaposha.portal`) from the command line."""

import os

from slaposha.cli.commands import UserError, command, setup_logging

_CONFIG = (('--config',), dict(metavar='FILE', help='the portal file'
                               ' (default /etc/opt/slaposha/portal.cfg or'
                               ' $SLAPOSHA_PORTAL_CONFIG)'))


@command('portal serve', 'run the portal in the foreground: every cluster of'
         ' the portal file on one page and in one JSON API, over HTTPS',
         [_CONFIG])
def portal_serve(args):
    import threading
    from slaposha.daemon import install_stop_signals
    from slaposha.portal.config import load_portal
    from slaposha.portal.server import Portal
    config = load_portal(args.config)
    setup_logging('portal')
    stop = threading.Event()
    install_stop_signals(stop.set)
    portal = Portal(config).start()
    try:
        stop.wait()
    finally:
        portal.stop()
    return 0


@command('portal init', 'create the portal CA (whose certificates may use'
         ' the portal) and the portal\'s own certificate in its ssl_dir', [
             _CONFIG,
             (('--ca-key',), dict(metavar='FILE', required=True,
                                  help='where to write the portal CA key:'
                                  ' outside ssl_dir (the portal refuses to'
                                  ' run beside a CA key); keep it off the'
                                  ' portal\'s machine')),
             (('--address',), dict(help='the portal\'s address, as browsers'
                                   ' reach it (default: [portal] listen)')),
             (('--name',), dict(help='its DNS name (default: this host\'s'
                                ' short name)')),
             (('--days',), dict(type=int, help='validity of the portal\'s'
                                ' certificate in days (default 825)')),
         ])
def portal_init(args):
    import ipaddress
    import socket
    from slaposha import pki
    from slaposha.portal.config import load_portal
    config = load_portal(args.config, check_files=False)
    ssl_dir = config.ssl_dir
    ca_path, cert_path, key_path, crl_path = config.files()
    ca_key_path = os.path.abspath(args.ca_key)
    if os.path.realpath(os.path.dirname(ca_key_path)) == \
            os.path.realpath(ssl_dir):
        raise UserError('--ca-key %s: not in ssl_dir %s (the portal never'
                        ' holds a CA key)' % (args.ca_key, ssl_dir))
    for path in (ca_path, key_path, ca_key_path):
        if os.path.exists(path):
            raise UserError('%s already exists: not overwritten' % path)
    address = args.address or config.portal.listen
    try:
        unspecified = ipaddress.ip_address(address).is_unspecified
    except ValueError:
        raise UserError('--address %s: not an IP address' % address)
    if unspecified:
        raise UserError('[portal] listen = %s: give the address browsers'
                        ' reach the portal on with --address' % address)
    if args.days is not None and args.days < 1:
        raise UserError('--days must be at least 1 (got %d)' % args.days)
    try:
        name = pki.check_name(args.name or socket.gethostname().split('.')[0],
                              'portal name')
        os.makedirs(ssl_dir, mode=0o755, exist_ok=True)
        os.makedirs(os.path.dirname(ca_key_path), mode=0o700, exist_ok=True)
        ca_key, ca_cert = pki.create_ca('portal')
        pki.write_key(ca_key_path, ca_key)
        pki.write_cert(ca_path, ca_cert, overwrite=False)
        pki.write_crl(crl_path, pki.empty_crl(ca_key, ca_cert))
        key = pki.new_key()
        pki.write_key(key_path, key)
        pki.write_cert(cert_path, pki.issue(
            ca_key, ca_cert, key.public_key(), name, pki.HOST_ROLE,
            address=address, days=args.days))
    except (pki.PkiError, OSError) as e:
        raise UserError(str(e))
    print('portal CA %s (key %s), revocation list %s' % (ca_path, ca_key_path,
                                                         crl_path))
    print('portal certificate %s for %s (%s), key %s' % (cert_path, name,
                                                         address, key_path))
    print('next: a certificate per user, where the CA key is: `slaposha cert'
          ' issue NAME --role operator|guest --ca-key %s --ca-cert %s --dir'
          ' DIR`; then keep %s off this machine' % (ca_key_path, ca_path,
                                                    ca_key_path))
    return 0


@command('portal check', 'check the portal file and its certificates, and'
         ' ask each cluster who the portal is there', [
             _CONFIG,
             (('--offline',), dict(action='store_true', help='only the'
                                   ' files; ask no cluster')),
         ])
def portal_check(args):
    from slaposha.api.client import ApiClient, ApiError
    from slaposha.portal.config import load_portal
    config = load_portal(args.config)
    settings = config.portal
    print('%s: portal %r on %s port %d, %d cluster(s): %s' % (
        config.path, settings.name, settings.listen, settings.port,
        len(config.clusters), ' '.join(config.clusters)))
    silent = 0
    for name, cluster in config.clusters.items():
        line = '%s%s: %d endpoint(s), certificate %s' % (
            name, ' (site %s)' % cluster.site if cluster.site else '',
            len(cluster.endpoints), cluster.role)
        if args.offline:
            print(line)
            continue
        errors = []
        for url in cluster.endpoints:
            try:
                with ApiClient(url, cluster.cert, cluster.key, cluster.ca,
                               timeout=settings.request_timeout) as client:
                    me = client.whoami()
                print('%s: %s answers: the portal is %s (%s) there' % (
                    line, url, me.get('name'), me.get('role')))
                break
            except ApiError as e:
                errors.append(str(e))
        else:
            silent += 1
            print('%s: no agent answers: %s' % (line, '; '.join(errors)))
    return 1 if silent else 0
