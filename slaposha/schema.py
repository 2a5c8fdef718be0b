"""What a key of a configuration file is: its type, default, limits and
line of documentation (:class:`Key`), the value types it parses (each a
function of the raw string that returns the value or raises ValueError
saying what was expected), and a parsed :class:`Section`.

Both the files' schema (:mod:`slaposha.config`) and the resource drivers,
which declare their keys (:mod:`slaposha.resources`), are written with it.
"""

import ipaddress
import os
import re
from collections import OrderedDict

from slaposha.inputs import cut, one_line

__all__ = ['Key', 'REQUIRED', 'Section', 'key_table', 'parse_name',
           'NAME_RE', 'MAX_VALUE', 'TYPES']

NAME_RE = re.compile(r'^[a-z0-9][a-z0-9_.-]{0,62}$', re.IGNORECASE)
# Characters of a value, unless its key says otherwise: any path fits
# (PATH_MAX); a megabyte-long value is a mistake, said as such.
MAX_VALUE = 4096


def _string(raw):
    return raw.strip()


def parse_name(raw):
    raw = raw.strip()
    if not NAME_RE.match(raw):
        raise ValueError('expected a name of letters, digits, "-", "_" or "."'
                         ' (got %s)' % cut(raw))
    return raw


def _integer(raw):
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError('expected a whole number (got %s)'
                         % cut(raw.strip()))


_DURATION_RE = re.compile(r'^\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*$')
_DURATION_UNITS = {None: 1.0, 's': 1.0, 'ms': 0.001, 'm': 60.0, 'h': 3600.0,
                   'd': 86400.0}


def _duration(raw):
    """Seconds, as ``3``, ``0.5``, ``500ms``, ``2s``, ``5m``, ``1h`` or
    ``1d``."""
    m = _DURATION_RE.match(raw)
    if not m:
        raise ValueError('expected a duration such as 3, 0.5, 500ms, 2s or 5m'
                         ' (got %s)' % cut(raw.strip()))
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_SIZE_RE = re.compile(r'^\s*([0-9]+)\s*([kmgt]i?b?|b)?\s*$', re.IGNORECASE)


def _size(raw):
    """Bytes, as ``4096``, ``512M``, ``2G`` (powers of 1024)."""
    m = _SIZE_RE.match(raw)
    if not m:
        raise ValueError('expected a size such as 4096, 512M or 2G'
                         ' (got %s)' % cut(raw.strip()))
    unit = (m.group(2) or 'b')[0].lower()
    return int(m.group(1)) * 1024 ** 'bkmgt'.index(unit)


_TRUE = ('true', 'yes', 'on', '1')
_FALSE = ('false', 'no', 'off', '0')


def _boolean(raw):
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError('expected true or false (got %s)' % cut(raw.strip()))


def _words(raw):
    """A list of words separated by spaces, commas or new lines."""
    return [w for w in re.split(r'[\s,]+', raw) if w]


def _names(raw):
    return [parse_name(w) for w in _words(raw)]


def _path(raw):
    raw = raw.strip()
    if not os.path.isabs(raw):
        raise ValueError('expected an absolute path (got %s)' % cut(raw))
    return os.path.normpath(raw)


def _address(raw):
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise ValueError('expected an IPv4 or IPv6 address (got %s)'
                         % cut(raw.strip()))


def _url(raw):
    raw = raw.strip()
    if not re.match(r'^https?://[^/\s]+', raw):
        raise ValueError('expected an http:// or https:// URL (got %s)'
                         % cut(raw))
    return raw.rstrip('/')


def _urls(raw):
    return [_url(w) for w in _words(raw)]


def _prefix(raw):
    raw = raw.strip()
    if not raw.isprintable() or re.search(r'\s', raw):
        raise ValueError('expected a key prefix with no white space or'
                         ' control character (got %s)' % cut(raw))
    return raw


TYPES = {
    'string': _string, 'name': parse_name, 'integer': _integer,
    'duration': _duration, 'size': _size, 'boolean': _boolean,
    'words': _words, 'names': _names, 'path': _path, 'address': _address,
    'url': _url, 'urls': _urls, 'choice': _string, 'prefix': _prefix,
}

REQUIRED = object()


class Key(object):
    """One configuration key: its type, default, limits and documentation.

    ``default`` may be REQUIRED, a value, or None (optional, no value);
    ``minimum``/``maximum`` bound numbers; ``choices`` lists allowed strings;
    ``max_length`` bounds the characters of the value (MAX_VALUE).
    """

    def __init__(self, name, type='string', default=None, doc='',
                 choices=None, minimum=None, maximum=None,
                 max_length=MAX_VALUE):
        if type not in TYPES:
            raise ValueError('unknown key type %r' % type)
        self.name = name
        self.type = type
        self.default = default
        self.doc = doc
        self.choices = choices
        self.minimum = minimum
        self.maximum = maximum
        self.max_length = max_length

    @property
    def required(self):
        return self.default is REQUIRED

    def parse(self, raw):
        if len(raw) > self.max_length:
            raise ValueError('%d characters, more than the %d allowed'
                             ' (got %s)' % (len(raw), self.max_length,
                                            cut(raw.strip())))
        value = TYPES[self.type](raw)
        if self.choices is not None and value not in self.choices:
            raise ValueError('expected one of %s (got %s)'
                             % (', '.join(self.choices), cut(value)))
        if self.minimum is not None and value < self.minimum:
            raise ValueError('must be at least %s (got %s)'
                             % (self.minimum, one_line(raw, 40)))
        if self.maximum is not None and value > self.maximum:
            raise ValueError('must be at most %s (got %s)'
                             % (self.maximum, one_line(raw, 40)))
        return value

    def describe(self):
        if self.required:
            default = 'required'
        elif self.default is None:
            default = 'optional'
        else:
            default = 'default %s' % _show(self.default)
        kind = self.type
        if self.choices:
            kind = '|'.join(self.choices)
        return '%s (%s, %s): %s' % (self.name, kind, default, self.doc)


def _show(value):
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, list):
        return ' '.join(value) or '(empty)'
    return str(value)


class Section(object):
    """The parsed values of one ini section, as attributes."""

    def __init__(self, name, values):
        self._name = name
        self.__dict__.update(values)

    def __repr__(self):
        items = ', '.join('%s=%r' % kv for kv in sorted(self.__dict__.items())
                          if not kv[0].startswith('_'))
        return '<[%s] %s>' % (self._name, items)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()
                if not k.startswith('_')}


def key_table(*keys):
    """{name: Key} of ``keys``, in their order."""
    return OrderedDict((k.name, k) for k in keys)
