"""Files of the node's host changed in place, the rest kept as it was:
written to a temporary file beside, synced, then renamed over (owner and
mode kept), so that a crash leaves the old file or the new one."""

import configparser
import os
import re

__all__ = ['write_atomic', 'read_ini', 'set_key']


def write_atomic(path, text, mode=0o644):
    """Write ``text`` to ``path``; an existing file keeps its owner and
    mode, a new one gets ``mode``."""
    tmp = path + '.slaposha-tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(path):
        st = os.stat(path)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
    os.rename(tmp, path)


def read_ini(path):
    config = configparser.ConfigParser(interpolation=None)
    with open(path) as f:
        config.read_file(f, source=path)
    return config


def set_key(path, section, key, value):
    """Set (or with ``value`` None, remove) ``key`` of ``[section]`` in an
    ini file such as slapos.cfg, changing that line only: comments and the
    rest stay."""
    with open(path) as f:
        lines = f.read().splitlines(True)
    out, current, done = [], None, False
    pattern = re.compile(r'^\s*%s\s*[=:]' % re.escape(key))
    for line in lines:
        header = re.match(r'^\s*\[([^\]]+)\]', line)
        if header:
            if current == section and not done and value is not None:
                out.append('%s = %s\n' % (key, value))
                done = True
            current = header.group(1).strip()
        elif current == section and pattern.match(line):
            if not done and value is not None:
                out.append('%s = %s\n' % (key, value))
            done = True
            continue
        out.append(line)
    if not done and value is not None:
        if current != section:
            if out and not out[-1].endswith('\n'):
                out.append('\n')
            out.append('\n[%s]\n' % section)
        out.append('%s = %s\n' % (key, value))
    write_atomic(path, ''.join(out))
