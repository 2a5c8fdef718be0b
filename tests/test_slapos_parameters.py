"""Parameters as the master sends them: plain, JSON in XML, instance XML."""

import pytest

from slaposha.slapos.parameters import parse_instance_xml, user_parameters


def test_plain_parameters_without_the_masters_own_keys():
    raw = {'greeting': 'hi', 'ip_list': [('lab0', '10.0.0.1')],
           'timestamp': '1.2', 'slap_software_type': 'default'}
    assert user_parameters(raw) == {'greeting': 'hi'}


def test_json_in_xml_is_unwrapped():
    raw = {'_': '{"port": 8080, "tags": ["a", "b"]}', 'timestamp': '1'}
    assert user_parameters(raw) == {'port': 8080, 'tags': ['a', 'b']}
    # What the master sends is read within limits (before: RecursionError).
    deep = '[' * 5000 + ']' * 5000
    assert user_parameters({'_': deep}) == {'_': deep}


def test_instance_xml_is_parsed_with_repeated_ids_joined():
    xml = ('<?xml version="1.0" encoding="utf-8"?><instance>'
           '<parameter id="a">1</parameter><parameter id="b">x</parameter>'
           '<parameter id="b">y</parameter></instance>')
    assert parse_instance_xml(xml) == {'a': '1', 'b': 'x y'}
    assert user_parameters({'slave': xml}) == {'slave': {'a': '1',
                                                          'b': 'x y'}}


def test_a_fingerprint_file_is_read_within_limits(tmp_path):
    """`slapos check --reference` and `prepare-standby` read an owner's
    fingerprint: nested 5000 deep it is one line (before: a RecursionError
    traceback)."""
    from slaposha.cli.commands import UserError, read_reference
    path = tmp_path / 'fingerprint.json'
    path.write_text('[' * 5000 + ']' * 5000)
    with pytest.raises(UserError) as e:
        read_reference(str(path))
    assert str(e.value) == '%s: cannot read the fingerprint: the' \
        ' fingerprint nests deeper than 32 levels' % path
    path.write_text('{"uid": 1}')
    assert read_reference(str(path)) == {'uid': 1}
