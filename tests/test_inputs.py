"""What comes in from others is read within limits and shown cut
(slaposha.inputs): no RecursionError, no megabyte-long error line, no
escape sequence reaching a terminal."""

import json
import time

import pytest

from slaposha.inputs import MAX_DEPTH, InputError, cut, loads, one_line


def test_deep_json_is_one_line_not_a_recursion_error():
    deep = '[' * 5000 + ']' * 5000
    with pytest.raises(RecursionError):
        json.loads(deep)   # what happened before: every caller crashed
    with pytest.raises(InputError, match='^body nests deeper than 32'):
        loads(deep, 65536, 'body', require=None)
    nested = '{"a": ' * MAX_DEPTH + '1' + '}' * MAX_DEPTH
    assert loads(nested, 65536)['a']['a']
    with pytest.raises(InputError, match='nests deeper'):
        loads('[' + nested + ']', 65536, require=list)
    # Brackets inside strings are text, not depth.
    text = json.dumps({'a': '[' * 100, 'b': '\\"[[[[' * 20})
    assert loads(text, 65536)['a'] == '[' * 100


@pytest.mark.parametrize('data, words', [
    (b'x' * 70000, 'of 70000 bytes is over the limit of 65536'),
    (b'\xff{}', 'not UTF-8'),
    (b'{"a": NaN}', 'NaN is not JSON'),
    (b'{"a": -Infinity}', 'Infinity is not JSON'),
    (b'{"a": 1', 'not JSON'),
    (b'[1, 2]', 'must be an object (got an array)'),
    (b'true', 'must be an object (got a boolean)'),
    (b'"\\u001b"', 'must be an object (got a string)'),
])
def test_what_is_refused_says_why_in_one_line(data, words):
    with pytest.raises(InputError) as e:
        loads(data, 65536, 'request of hB')
    line = str(e.value)
    assert line.startswith('request of hB ') and words in line, line
    assert '\n' not in line and len(line) < 200


def test_a_megabyte_of_brackets_is_refused_quickly():
    began = time.monotonic()
    with pytest.raises(InputError):
        loads('[' * 1000000, 2 << 20, 'value', require=None)
    assert time.monotonic() - began < 2


def test_values_are_cut_printable_with_their_length():
    assert cut('hB') == "'hB'"
    assert cut('x' * 1000000) == "'%s'... (1000000 characters)" % ('x' * 80)
    assert cut(b'\x00' * 100, 4) == "b'\\x00\\x00\\x00\\x00'... (100 bytes)"
    assert cut('\x1b[2J\ud800') == "'\\x1b[2J\\ud800'"
    assert cut(12) == '12' and cut(None) == 'None'
    assert one_line('a\n\tb \x1b[31m c') == 'a b \\x1b[31m c'
    line = one_line('y' * 1000)
    assert len(line) == 300 and line.endswith('...')
