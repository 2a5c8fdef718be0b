"""The node's identity kept inside its replicated data.

/etc/opt/slapos (slapos.cfg, the node's certificate and key, the
partitions' certificates) identifies the node to the master; it must move
with the node. Its owner keeps a copy in ``instance_root/.slaposha/
identity`` (0700), which the data resource replicates, and a new owner
installs it before it starts the node (resources/slapos.py).
"""

import os

from slaposha.resources import copy_folder

__all__ = ['copy_path', 'save', 'install']


def copy_path(node):
    return os.path.join(node.instance_root, '.slaposha', 'identity')


def save(node, folder):
    """Copy ``folder`` (the identity) into the node's data."""
    copy = copy_path(node)
    os.makedirs(os.path.dirname(copy), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(copy), 0o700)
    copy_folder(folder, copy, delete=True)
    return copy


def install(node, folder):
    """Put the copy kept in the data in place; False when there is none."""
    copy = copy_path(node)
    if not os.path.isdir(copy):
        return False
    copy_folder(copy, folder, delete=False)
    return True
