"""What comes into the agent from others: read within limits, shown cut.

Every JSON text the agent did not write itself goes through :func:`loads`:
API bodies, peers' requests and answers on the replication channel, the
values other hosts write in etcd (intents, membership and health, facts,
history). It refuses, as one :class:`InputError` line, a text over its
size limit, one nested deeper than :data:`MAX_DEPTH` (Python's parser
recurses: ``[[[[...]]]]`` of a few kilobytes ends in a RecursionError,
which no caller expects), and what strict JSON is not (``NaN``,
``Infinity``, invalid UTF-8).

What a peer sends over a socket may have to come whole by a deadline
(:class:`DeadlineReader`): a socket timeout alone starts again at each
byte, and a peer that trickles would hold the connection for good. A
server counts the connections each client holds (:class:`Clients`), so
that one client never takes every slot from the others.

Whatever a user or a peer sent that an error line repeats goes through
:func:`cut` (a value) or :func:`one_line` (a message, a command's output):
printable, on one line, at most a readable length, so that a megabyte-long
value or an escape sequence never reaches a terminal or a log whole.
"""

import io
import json
import socket
import threading
import time

__all__ = ['InputError', 'loads', 'check_fields', 'cut', 'one_line',
           'MAX_DEPTH', 'MAX_VALUE', 'NUMBER', 'DeadlineReader', 'Clients']

# Deep enough for anything slaposha writes (status and facts nest about
# five levels), far below Python's recursion limit.
MAX_DEPTH = 32
# A value another host wrote in etcd (etcd takes requests up to 1.5 MiB).
MAX_VALUE = 1 << 20
NUMBER = (int, float)
CUT = 80          # characters of a value repeated in an error
LINE = 300        # characters of a message or of a command's output

class InputError(ValueError):
    """Input refused, as one line naming what it was."""


def _refuse_constant(name):
    raise ValueError('%s is not JSON' % name)


def _too_deep(value, depth):
    """Whether the parsed ``value`` nests containers deeper than
    ``depth`` (looked at level by level, without recursion)."""
    level = [value]
    for _ in range(depth):
        below = []
        for item in level:
            for child in (item.values() if isinstance(item, dict)
                          else item):
                if isinstance(child, (dict, list)):
                    below.append(child)
        if not below:
            return False
        level = below
    return True


def loads(data, limit, what='JSON', depth=MAX_DEPTH, require=dict):
    """The JSON value of ``data`` (bytes or str) of at most ``limit`` bytes
    (characters for a str), nested at most ``depth`` deep, of type
    ``require`` (None: any). InputError (a ValueError) names ``what``
    ("body", "request of hB") and says what is wrong."""
    if len(data) > limit:
        raise InputError('%s of %d bytes is over the limit of %d' % (
            what, len(data), limit))
    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode('utf-8')
        except UnicodeDecodeError as e:
            raise InputError('%s is not JSON: not UTF-8 (byte %d)' % (
                what, e.start))
    try:
        value = json.loads(data, parse_constant=_refuse_constant)
    except ValueError as e:
        raise InputError('%s is not JSON: %s' % (what, one_line(e)))
    except RecursionError:   # the parser's own limit, far beyond ours
        too_deep = True
    else:
        too_deep = isinstance(value, (dict, list)) and \
            data.count('[') + data.count('{') > depth and \
            _too_deep(value, depth)
    if too_deep:
        raise InputError('%s nests deeper than %d levels' % (what, depth))
    if require is not None and not isinstance(value, require):
        raise InputError('%s must be %s (got %s)' % (
            what, _kind_name(require), _kind(value)))
    return value


# JSON's names of Python's types (bool before int: True is an int).
_KINDS = ((bool, 'a boolean'), (int, 'an integer'), (float, 'a number'),
          (str, 'a string'), (list, 'an array'), (dict, 'an object'),
          (type(None), 'null'))


def _kind(value):
    return next(name for kind, name in _KINDS if isinstance(value, kind))


def _kind_name(kind):
    if isinstance(kind, list):
        return 'an array of %ss' % _kind_name(kind[0]).split()[-1]
    return dict(_KINDS)[type(None) if kind is None else kind]


def _is(value, kind):
    if isinstance(kind, list):
        return isinstance(value, list) and all(_is(v, kind[0])
                                               for v in value)
    if kind is None:
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False   # JSON true is no number
    return isinstance(value, kind)


def check_fields(obj, fields, what):
    """``obj`` (a dict from :func:`loads`) if each of ``fields`` has the
    type it must: ``{name: a type, a list of one type (an array of those),
    or a tuple of these (None: absent or null)}``; an integer or a number
    is never a boolean. Else InputError naming ``what`` and the field."""
    for name, kind in fields.items():
        value = obj.get(name)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not any(_is(value, k) for k in kinds):
            raise InputError('%s: field %s must be %s (got %s)' % (
                what, name, ' or '.join(_kind_name(k) for k in kinds),
                one_line(json.dumps(value), CUT) if name in obj
                else 'nothing'))
    return obj


def cut(value, size=CUT):
    """``value`` as an error line shows it: a string or bytes quoted with
    its control and escape characters written out (as repr does), anything
    else as str(); at most ``size`` characters of it, followed by its whole
    length when it was longer."""
    if isinstance(value, (str, bytes, bytearray)):
        shown = repr(bytes(value[:size]) if isinstance(value, bytearray)
                     else value[:size])
    else:
        text = str(value)
        value = text
        shown = _printable(text[:size])
    if len(value) > size:
        return '%s... (%d %s)' % (shown, len(value), 'bytes' if isinstance(
            value, (bytes, bytearray)) else 'characters')
    return shown


def one_line(text, size=LINE):
    """A message or a command's output as one printable line of at most
    ``size`` characters (white space runs become one space)."""
    text = ' '.join(str(text if text is not None else '').split())
    if len(text) > size:
        text = text[:size - 3] + '...'
    return _printable(text)


def _printable(text):
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class DeadlineReader(io.RawIOBase):
    """The bytes of socket ``sock`` (for an io.BufferedReader): each read
    waits at most until ``deadline`` (a time.monotonic(); None: the
    socket's ``timeout`` per read, which the socket keeps for writes)."""

    def __init__(self, sock, timeout, deadline=None):
        self.sock = sock
        self.timeout = timeout
        self.deadline = deadline

    def within(self, seconds):
        """What is read from now on must come within ``seconds`` (None:
        no deadline)."""
        self.deadline = None if seconds is None else \
            time.monotonic() + seconds

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.deadline is None:
            return self.sock.recv_into(buffer)
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout('not complete by its deadline')
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buffer)
        finally:
            self.sock.settimeout(self.timeout)


class Clients(object):
    """How many connections each client holds, each at most ``limit`` (the
    API's servers and the replication receivers)."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._counts = {}

    def take(self, key):
        with self._lock:
            count = self._counts.get(key, 0)
            if count >= self.limit:
                return False
            self._counts[key] = count + 1
            return True

    def give(self, key):
        with self._lock:
            count = self._counts.pop(key) - 1
            if count:
                self._counts[key] = count
