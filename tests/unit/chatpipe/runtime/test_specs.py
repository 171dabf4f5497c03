"""chatpipe/runtime/specs.py: the grammar of setting values the services parse (source networks, channel
ids; API keys are tested with their use in tests/unit/sinks/test_auth.py)."""

from __future__ import annotations

import ipaddress

import pytest

from chatpipe.runtime.specs import EIGHT_BY_EIGHT_WEBHOOK_IPS, parse_channel_ids, parse_networks


def test_networks_parse_addresses_cidrs_and_the_8x8_list() -> None:
    nets = parse_networks(" 10.1.2.3/8 , 192.168.1.5,, 2001:db8::/32 ,")
    assert nets == (
        ipaddress.ip_network("10.0.0.0/8"),  # host bits allowed, masked off
        ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    eight = parse_networks("8X8")
    assert [str(n.network_address) for n in eight] == list(EIGHT_BY_EIGHT_WEBHOOK_IPS)
    assert all(n.num_addresses == 1 for n in eight)
    assert parse_networks("") == () and parse_networks(" , ") == ()


@pytest.mark.parametrize("spec", ["10.0.0.300", "8x8,example.com", "10.0.0.0/33", "::g"])
def test_a_bad_network_is_refused_by_name(spec: str) -> None:
    bad = spec.split(",")[-1]
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        parse_networks(spec)


def test_channel_ids_by_subaccount_and_channel_in_any_case() -> None:
    assert parse_channel_ids(" acme:WhatsApp=wa-1 , acme:sms=sms-9,, other:GoogleRCS = r-2 ") == {
        ("acme", "whatsapp"): "wa-1",
        ("acme", "sms"): "sms-9",
        ("other", "googlercs"): "r-2",
    }
    assert parse_channel_ids("") == {}


@pytest.mark.parametrize("entry", ["acme=wa-1", "acme:whatsapp", ":whatsapp=x", "acme:=x", "acme:sms= "])
def test_a_bad_channel_id_entry_is_refused_by_name(entry: str) -> None:
    with pytest.raises(ValueError, match="expected subAccountId:channel=channelId"):
        parse_channel_ids("ok:sms=1," + entry)
