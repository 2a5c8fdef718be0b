"""Instance parameters: what the master gave each partition, kept on disk.

The master's parameters are rendered into a partition's files by buildout
and are otherwise only on the master. The owner of the node saves them,
for each partition, in ``instance_root/.slaposha/parameters.json`` (in the
replicated data), so that a takeover never needs the master and an operator
can see what each partition was deployed with (``slaposha slapos
partitions``), even with the master out of reach.

They are read with the slap library (as slapgrid reads them); a software
release that serialises its parameters as JSON in XML (one ``_`` parameter)
is unwrapped; parameters that arrive as an ``<instance>`` XML document are
parsed with lxml.
"""

import json
import os
import time

from lxml import etree

from slaposha.inputs import MAX_VALUE, loads

__all__ = ['fetch', 'save', 'load', 'ParametersError', 'parameters_path']

# Keys the master adds to every partition's dict; the rest are the user's.
SYSTEM_KEYS = ('ip_list', 'full_ip_list', 'timestamp', 'slap_computer_id',
               'slap_computer_partition_id', 'slap_software_type',
               'slap_software_release_url', 'slave_instance_list',
               'instance_title', 'root_instance_title', 'instance_guid',
               'root_instance_short_title', 'full_address_list')


class ParametersError(Exception):
    """The parameters cannot be fetched or read, as one line."""


def parameters_path(node):
    return os.path.join(node.instance_root, '.slaposha', 'parameters.json')


def parse_instance_xml(text):
    """{id: value} of an ``<instance><parameter id=..>`` document."""
    root = etree.fromstring(text.encode() if isinstance(text, str) else text)
    values = {}
    for element in root.iter('parameter'):
        key = element.get('id')
        if key is None:
            continue
        value = element.text or ''
        # Repeated ids are joined with spaces, as slapos.util.xml2dict does.
        values[key] = values[key] + ' ' + value if key in values else value
    return values


def user_parameters(raw):
    """The user's parameters out of what the master sends."""
    user = {k: v for k, v in raw.items() if k not in SYSTEM_KEYS}
    if set(user) == {'_'}:  # json-in-xml serialisation
        try:
            return loads(user['_'], MAX_VALUE, 'instance parameters',
                         require=None)
        except ValueError:
            return user
    for key, value in list(user.items()):
        if isinstance(value, str) and '<instance' in value[:100] and \
                value.lstrip().startswith('<'):
            try:
                user[key] = parse_instance_xml(value)
            except etree.XMLSyntaxError:
                pass
    return user


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def fetch(node, timeout=30):
    """{partition id: {...}} from the master, with the node's identity."""
    from slapos import slap as slapmodule
    from slapos.slap.exception import ResourceNotReady
    if not node.master_url:
        raise ParametersError('%s: [slapos] master_url is not set'
                              % node.config_path)
    connection = slapmodule.slap()
    try:
        connection.initializeConnection(
            node.master_url, key_file=node.key_file,
            cert_file=node.cert_file, timeout=timeout)
        partitions = connection.registerComputer(
            node.computer_id).getComputerPartitionList()
    except Exception as e:  # requests, slap and marshalling errors alike
        raise ParametersError('master %s: cannot read the partitions of %s:'
                              ' %s' % (node.master_url, node.computer_id,
                                       str(e).splitlines()[0] if str(e)
                                       else type(e).__name__))
    found = {}
    for cp in partitions:
        try:
            state = cp.getState()
        except ResourceNotReady:
            continue  # a free partition: nothing deployed
        raw = cp.getInstanceParameterDict() or {}
        try:
            release = cp.getSoftwareRelease().getURI()
        except Exception:
            release = raw.get('slap_software_release_url')
        found[cp.getId()] = _jsonable({
            'state': state,
            'software_release': release,
            'software_type': raw.get('slap_software_type'),
            'title': raw.get('instance_title'),
            'timestamp': raw.get('timestamp'),
            'parameters': user_parameters(raw),
        })
    return found


def save(node, partitions):
    """Write them atomically, readable by root only (they may hold
    passwords)."""
    path = parameters_path(node)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + '.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        json.dump({'saved': time.time(), 'master': node.master_url,
                   'computer_id': node.computer_id,
                   'partitions': partitions}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return path


def load(node):
    """What was saved last, or None."""
    path = parameters_path(node)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ParametersError('%s: unreadable: %s' % (path, e))
