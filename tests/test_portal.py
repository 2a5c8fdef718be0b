"""The portal (``slaposha portal``): its file, its certificates and its
commands."""

import os
import shutil

from slaposha import pki
from slaposha.cli.main import main


def issue(folder, stem, ca_key, ca_cert, name, role, address=None):
    key = pki.new_key()
    cert = pki.issue(ca_key, ca_cert, key.public_key(), name, role,
                     address=address, days=2)
    os.makedirs(folder, exist_ok=True)
    pki.write_key(os.path.join(folder, stem + '.key'), key, overwrite=True)
    pki.write_cert(os.path.join(folder, stem + '.crt'), cert)
    return os.path.join(folder, stem + '.crt'), os.path.join(folder,
                                                            stem + '.key')


def operator_dir(folder, ca_key, ca_cert, ca_path, role, name='portal'):
    """What `slaposha cert issue --dir` leaves: the portal's certificate
    for a cluster."""
    issue(folder, 'operator', ca_key, ca_cert, name, role)
    shutil.copy(ca_path, os.path.join(folder, 'ca.crt'))
    return folder


# -- the portal file and its commands -----------------------------------------

def test_portal_file_mistakes_are_one_line_and_it_never_runs_beside_a_ca_key(
        tmp_path, capsys):
    folder = str(tmp_path)
    ca_key, ca_cert = pki.create_ca('lab-a')
    ca_path = pki.write_cert(os.path.join(folder, 'lab-ca.crt'), ca_cert)
    certs = operator_dir(os.path.join(folder, 'a'), ca_key, ca_cert, ca_path,
                         'operator')
    ca_dir = os.path.join(folder, 'portal-ca')
    path = os.path.join(folder, 'portal.cfg')

    def check(text, *expected):
        with open(path, 'w') as f:
            f.write(text)
        code = main(['portal', 'check', '--offline', '--config', path])
        out, err = capsys.readouterr()
        for words in expected:
            assert words in err, err
        if expected:
            assert code == 2 and err.count('\n') == 1, err
        return code, out

    cluster = '[cluster a]\nendpoints = https://10.0.0.1:1215\n' \
        'cert_dir = %s\n' % certs
    check('[portal]\nport = 99999\n' + cluster, '[portal] port: must be at'
          ' most 65535')
    check('[portal]\ncolour = red\n' + cluster, '[portal] colour: unknown'
          ' key')
    check('[portal]\n', 'no [cluster <name>] section')
    check(cluster.replace('https', 'http'), '[cluster a] endpoints:',
          'HTTPS only')
    check(cluster + cluster.replace('[cluster a]', '[cluster b]'),
          'also an endpoint of cluster a')
    # The portal's own files: `portal init` makes them, never beside its
    # CA key, and never twice.
    portal = '[portal]\nlisten = 127.0.0.1\nssl_dir = %s\n' % os.path.join(
        folder, 'ssl') + cluster
    check(portal, '[portal] ssl_dir:', 'portal init')
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(folder, 'ssl', 'ca.key')]) == 2
    assert 'not in ssl_dir' in capsys.readouterr().err
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(ca_dir, 'ca.key'), '--name', 'portal']) == 0
    assert 'portal certificate' in capsys.readouterr().out
    assert stat_mode(os.path.join(ca_dir, 'ca.key')) == 0o600
    assert not os.path.exists(os.path.join(folder, 'ssl', 'ca.key'))
    assert main(['portal', 'init', '--config', path, '--ca-key',
                 os.path.join(ca_dir, 'other.key')]) == 2
    assert 'already exists' in capsys.readouterr().err
    code, out = check(portal)
    assert code == 0 and 'a: 1 endpoint(s), certificate operator' in out
    check(portal.replace(certs, folder), '[cluster a] cert_dir:',
          'operator.key')
    # A CA key where the portal reads its files, a key others may read, a
    # host's or a CA's certificate: refused, each in one line.
    shutil.copy(os.path.join(ca_dir, 'ca.key'), os.path.join(certs,
                                                             'ca.key'))
    check(portal, '[cluster a] cert_dir:', 'the portal never holds one')
    os.unlink(os.path.join(certs, 'ca.key'))
    os.chmod(os.path.join(certs, 'operator.key'), 0o644)
    check(portal, 'readable by others')
    os.chmod(os.path.join(certs, 'operator.key'), 0o600)
    issue(certs, 'operator', ca_key, ca_cert, 'hA', 'host', '10.0.0.1')
    check(portal, 'has role host')
    pki.write_key(os.path.join(certs, 'operator.key'), ca_key, overwrite=True)
    pki.write_cert(os.path.join(certs, 'operator.crt'), ca_cert)
    check(portal, 'is a CA certificate')
    # The keys are documented with the others.
    assert main(['config', 'keys']) == 0
    out = capsys.readouterr().out
    assert '# portal file' in out and 'poll_interval (duration' in out


def stat_mode(path):
    return os.stat(path).st_mode & 0o777
