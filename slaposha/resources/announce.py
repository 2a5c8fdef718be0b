"""Telling a segment that an address moved: gratuitous ARP, unsolicited NA.

When a service address moves to another host, its neighbours still send to
the old host's MAC: their entry stays REACHABLE, then STALE, then goes
through DELAY and PROBE to FAILED before they resolve the address again.
In the lab that was 33 s (IPv6) and 39 s (IPv4) of silence after a takeover
(reference/slapos-lab-takeover.md, trap 1). One announcement per address
switched every neighbour within 44 ms:

- IPv4: a gratuitous ARP, in the ARP announcement form of RFC 5227 (a
  request whose sender and target address are both the moved address),
  broadcast from an AF_PACKET socket. Linux updates an existing entry on it
  even with ``arp_accept = 0``, overriding its ``locktime``.
- IPv6: an unsolicited neighbour advertisement with the override flag, to
  all nodes (ff02::1), hop limit 255 (neighbours drop any other), from the
  moved address itself. The kernel's own (``ndisc_notify``) comes only after
  DAD, and never for ``nodad`` addresses, so it cannot be relied upon.

Neither creates entries in neighbours that had none: they only correct the
ones that point to the old host, which is what matters.

:func:`conflicts` asks the opposite question before an address is added:
does some other host answer for it already (an ARP probe, a neighbour
solicitation)?

Everything here needs CAP_NET_RAW, and works on Ethernet-like devices only
(veth, bridges, bonds, VLANs); on others there is no MAC to announce and
:func:`hardware_address` returns None.
"""

import fcntl
import ipaddress
import select
import socket
import struct
import time

__all__ = ['announce', 'conflicts', 'hardware_address', 'format_mac']

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPHRD_ETHER = 1
SIOCGIFHWADDR = 0x8927
BROADCAST = b'\xff' * 6

ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
ND_OPT_SOURCE_LINKADDR = 1
ND_OPT_TARGET_LINKADDR = 2
NA_FLAG_OVERRIDE = 0x20000000
ALL_NODES = 'ff02::1'


def format_mac(raw):
    return ':'.join('%02x' % b for b in raw)


def hardware_address(dev):
    """The Ethernet address of ``dev`` (6 bytes), or None when the device
    has none (a tunnel, loopback). Asked with an ioctl rather than read in
    /sys/class/net, which shows the devices of the network namespace that
    mounted /sys, not necessarily ours."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR,
                            struct.pack('256s', dev.encode()[:15]))
    family, = struct.unpack_from('H', ifreq, 16)  # sa_family, host order
    if family != ARPHRD_ETHER:
        return None
    return ifreq[18:24]


def _arp(mac, op, sender_ip, target_ip):
    """An Ethernet broadcast frame carrying one ARP packet, padded to the
    60-byte minimum (a NIC pads on its own, a veth does not need it, but a
    bridge to a real wire may)."""
    frame = BROADCAST + mac + struct.pack('!H', ETH_P_ARP) + struct.pack(
        '!HHBBH6s4s6s4s', ARPHRD_ETHER, ETH_P_IP, 6, 4, op, mac,
        sender_ip, b'\0' * 6, target_ip)
    return frame.ljust(60, b'\0')


def _packet_socket(dev):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                      socket.htons(ETH_P_ARP))
    s.bind((dev, ETH_P_ARP))
    return s


def _icmp6_socket(dev, source=None):
    """A raw ICMPv6 socket sending on ``dev`` with hop limit 255 (neighbour
    discovery messages with any other are dropped by the receivers). The
    kernel fills in the ICMPv6 checksum of such sockets."""
    index = socket.if_nametoindex(dev)
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        # Our own kernel would only log that someone advertises its address.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        if source is not None:
            scope = index if source.is_link_local else 0
            s.bind((str(source), 0, 0, scope))
    except OSError:
        s.close()
        raise
    return s, index


def _na(mac, target):
    """An unsolicited neighbour advertisement: override flag, no solicited
    flag, with our MAC as target link-layer address option."""
    return struct.pack('!BBHI16s', ND_NEIGHBOR_ADVERT, 0, 0, NA_FLAG_OVERRIDE,
                       target.packed) + struct.pack(
        '!BB6s', ND_OPT_TARGET_LINKADDR, 1, mac)


def announce(dev, addresses, count=1, interval=0.1):
    """Send ``count`` rounds, ``interval`` seconds apart, of one gratuitous
    ARP per IPv4 and one unsolicited NA per IPv6 address of ``addresses``
    (ipaddress objects or strings, with or without prefix). Each IPv6 address
    must be on ``dev`` and not tentative (it is the source of its NA).
    Returns how many packets were sent; raises OSError."""
    addresses = [ipaddress.ip_interface(a).ip for a in addresses]
    mac = hardware_address(dev)
    if mac is None or not addresses:
        return 0
    v4 = [a for a in addresses if a.version == 4]
    v6 = [a for a in addresses if a.version == 6]
    sent = 0
    arp = _packet_socket(dev) if v4 else None
    na = []
    try:
        for a in v6:
            s, index = _icmp6_socket(dev, source=a)
            na.append((s, index, _na(mac, a)))
        for round in range(count):
            if round:
                time.sleep(interval)
            for a in v4:
                arp.send(_arp(mac, 1, a.packed, a.packed))
                sent += 1
            for s, index, message in na:
                s.sendto(message, (ALL_NODES, 0, 0, index))
                sent += 1
    finally:
        if arp is not None:
            arp.close()
        for s, _, _ in na:
            s.close()
    return sent


def _solicited_node(address):
    """ff02::1:ffXX:XXXX, the group that address's owner listens on."""
    return ipaddress.IPv6Address(
        b'\xff\x02' + b'\0' * 9 + b'\x01\xff' + address.packed[13:])


def _ns(mac, target):
    return struct.pack('!BBHI16s', ND_NEIGHBOR_SOLICIT, 0, 0, 0,
                       target.packed) + struct.pack(
        '!BB6s', ND_OPT_SOURCE_LINKADDR, 1, mac)


def conflicts(dev, addresses, timeout=0.2):
    """Which of ``addresses`` another host on ``dev``'s segment answers for
    already, as {address string: MAC string}. IPv4: an ARP probe (sender
    address 0.0.0.0, RFC 5227); IPv6: a neighbour solicitation to the
    address's solicited-node group. Waits ``timeout`` seconds for answers.
    Call it before the addresses are added here: our own kernel would
    answer otherwise."""
    addresses = [ipaddress.ip_interface(a).ip for a in addresses]
    mac = hardware_address(dev)
    if mac is None or not addresses:
        return {}
    v4 = {a.packed: a for a in addresses if a.version == 4}
    v6 = {a.packed: a for a in addresses if a.version == 6}
    found = {}
    arp = icmp = None
    try:
        if v4:
            arp = _packet_socket(dev)
            for packed in v4:
                arp.send(_arp(mac, 1, b'\0' * 4, packed))
        if v6:
            # The source is the kernel's choice among dev's addresses: the
            # owner answers it unicast, as any address resolution.
            icmp, index = _icmp6_socket(dev)
            for packed, a in v6.items():
                icmp.sendto(_ns(mac, a), (str(_solicited_node(a)), 0, 0,
                                          index))
        socks = [s for s in (arp, icmp) if s is not None]
        deadline = time.monotonic() + timeout
        while len(found) < len(addresses):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select(socks, [], [], left)
            for s in ready:
                data = s.recv(2048)
                if s is arp:
                    _read_arp(data, mac, v4, found)
                else:
                    _read_na(data, v6, found)
    finally:
        for s in (arp, icmp):
            if s is not None:
                s.close()
    return found


def _read_arp(frame, mac, wanted, found):
    # Any ARP packet whose sender is one of the addresses, from another
    # MAC: a reply to our probe, or that host's own announcement.
    if len(frame) < 42 or frame[12:14] != b'\x08\x06':
        return
    sender_mac, sender_ip = frame[22:28], frame[28:32]
    if sender_ip in wanted and sender_mac != mac:
        found[str(wanted[sender_ip])] = format_mac(sender_mac)


def _read_na(message, wanted, found):
    # A raw ICMPv6 socket gets the ICMPv6 message without its IPv6 header.
    if len(message) < 24 or message[0] != ND_NEIGHBOR_ADVERT:
        return
    target = message[8:24]
    if target not in wanted:
        return
    lladdr = '?'
    options = message[24:]
    while len(options) >= 8 and options[1]:
        size = options[1] * 8
        if options[0] == ND_OPT_TARGET_LINKADDR:
            lladdr = format_mac(options[2:8])
        options = options[size:]
    found[str(wanted[target])] = lladdr
