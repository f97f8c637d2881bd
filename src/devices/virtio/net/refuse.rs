//! Network backend of a sandbox with no way out (`egress: false`).
//!
//! No tap sits behind this device: every frame the guest sends ends here and
//! nothing is ever forwarded. Dropping every frame would keep traffic in just
//! as well, but then the guest cannot tell "no network" from "slow network":
//! a TCP connect() resends its SYN for about two minutes and a DNS lookup
//! waits out every resolver timeout. So this backend plays the guest's
//! default gateway just far enough to say no at once:
//!
//! - it answers ARP requests for the gateway's address, so the guest goes on
//!   to send its IP packets there;
//! - it answers each IPv4 packet with an ICMP "destination unreachable,
//!   communication administratively prohibited" (type 3, code 13), as a
//!   filtering router would. Linux hands that to a connecting TCP socket and
//!   to a connected UDP socket as EHOSTUNREACH ("No route to host") at once.
//!
//! It stays silent where a router must (RFC 1122 3.2.2, RFC 1812 4.3.2.7):
//! no error about an ICMP error, a non-first fragment, a packet from a
//! non-unicast source, or one sent to a broadcast or multicast address
//! (IP or link layer). IPv6 and anything else gets no answer. Frames are
//! entirely guest-controlled, so parsing is bounds-checked throughout, and
//! answers are built on the stack (nothing is allocated per frame).

/// The gateway's address as the guest sees it.
pub const GATEWAY_IP: [u8; 4] = [172, 16, 0, 1];
/// The gateway's MAC (the same in every sandbox, egress or not).
pub const GATEWAY_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x01];
/// Largest frame answered or read (Ethernet header + 1500).
pub const MAX_FRAME: usize = 1514;

const ETH_HLEN: usize = 14;
/// Shortest Ethernet frame (without FCS); the ARP reply is padded to it.
const ETH_MIN: usize = 60;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethernet/IPv4 ARP: htype 1, ptype 0x0800, hlen 6, plen 4.
const ARP_ETH_IPV4: [u8; 6] = [0, 1, 8, 0, 6, 4];
/// The guest's /30 broadcast address.
const SUBNET_BROADCAST: [u8; 4] = [172, 16, 0, 3];
const IPPROTO_ICMP: u8 = 1;
/// ICMP header + quoted IP header (at most 60 bytes) + 8 bytes of its payload.
const ICMP_MAX: usize = 8 + 60 + 8;

/// The answer to one frame the guest sent, if any: written into `out` (a
/// buffer the caller owns, at least MAX_FRAME long), returns the answer's
/// length; None = no answer (drop).
pub fn answer(frame: &[u8], out: &mut [u8]) -> Option<usize> {
    match be16(frame, 12)? {
        ETHERTYPE_ARP => arp_reply(frame, out),
        ETHERTYPE_IPV4 => unreachable(frame, out),
        _ => None,
    }
}

fn arp_reply(frame: &[u8], out: &mut [u8]) -> Option<usize> {
    let arp = frame.get(ETH_HLEN..ETH_HLEN + 28)?;
    // Only a request (op 1) for the gateway: the guest's own probes and
    // announcements, and any reply, need no answer.
    if arp.get(..6)? != ARP_ETH_IPV4 || be16(arp, 6)? != 1 || arp.get(24..28)? != GATEWAY_IP {
        return None;
    }
    let mut r = [0u8; ETH_MIN];
    r[0..6].copy_from_slice(frame.get(6..12)?);
    r[6..12].copy_from_slice(&GATEWAY_MAC);
    r[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    r[14..20].copy_from_slice(&ARP_ETH_IPV4);
    r[20..22].copy_from_slice(&2u16.to_be_bytes());
    r[22..28].copy_from_slice(&GATEWAY_MAC);
    r[28..32].copy_from_slice(&GATEWAY_IP);
    r[32..42].copy_from_slice(arp.get(8..18)?); // the requester's MAC and IP
    emit(&r, out)
}

fn unreachable(frame: &[u8], out: &mut [u8]) -> Option<usize> {
    // A link-layer broadcast or multicast (group bit of the destination MAC)
    // gets no ICMP error (RFC 1122 3.2.2).
    if frame.first()? & 1 != 0 {
        return None;
    }
    let ip = frame.get(ETH_HLEN..)?;
    let ver_ihl = *ip.first()?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    let total = usize::from(be16(ip, 2)?);
    if ver_ihl >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    // The datagram without any Ethernet padding after it.
    let ip = ip.get(..total)?;
    if be16(ip, 6)? & 0x1fff != 0 {
        return None; // non-first fragment: the first one gets the answer
    }
    let src = addr(ip, 12)?;
    let dst = addr(ip, 16)?;
    // 0/8, multicast, 240/4 and 255.255.255.255 are no single host to answer.
    if src[0] == 0 || src[0] >= 224 || src == SUBNET_BROADCAST {
        return None;
    }
    if dst[0] & 0xf0 == 0xe0 || dst == [255; 4] || dst == SUBNET_BROADCAST {
        return None;
    }
    // Never an error about an error; an ICMP message too short to show its
    // type is treated as one.
    if *ip.get(9)? == IPPROTO_ICMP && matches!(ip.get(ihl), None | Some(3 | 4 | 5 | 11 | 12)) {
        return None;
    }

    let quote = ip.get(..total.min(ihl + 8))?;
    let icmp_len = 8 + quote.len();
    let ip_len = 20 + icmp_len;
    let mut r = [0u8; ETH_HLEN + 20 + ICMP_MAX];
    r[0..6].copy_from_slice(frame.get(6..12)?);
    r[6..12].copy_from_slice(&GATEWAY_MAC);
    r[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    let (_, rest) = r.split_at_mut(ETH_HLEN);
    let (h, icmp) = rest.split_at_mut(20);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&u16::try_from(ip_len).ok()?.to_be_bytes());
    h[8] = 64; // TTL
    h[9] = IPPROTO_ICMP;
    h[12..16].copy_from_slice(&GATEWAY_IP);
    h[16..20].copy_from_slice(&src);
    let sum = checksum(h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = icmp.get_mut(..icmp_len)?;
    icmp[0] = 3; // destination unreachable
    icmp[1] = 13; // communication administratively prohibited
    icmp.get_mut(8..)?.copy_from_slice(quote);
    let sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    emit(r.get(..ETH_HLEN + ip_len)?, out)
}

/// Copies a built answer into the caller's buffer (None if it does not fit).
fn emit(answer: &[u8], out: &mut [u8]) -> Option<usize> {
    out.get_mut(..answer.len())?.copy_from_slice(answer);
    Some(answer.len())
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..)?.first_chunk::<2>().map(|c| u16::from_be_bytes(*c))
}

fn addr(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..)?.first_chunk::<4>().copied()
}

/// Internet checksum (RFC 1071) of `data` whose checksum field is zero.
fn checksum(data: &[u8]) -> u16 {
    let mut words = data.chunks_exact(2);
    let mut sum: u32 = (&mut words).map(|w| u32::from(u16::from_be_bytes([w[0], w[1]]))).sum();
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0xac, 0x10, 0x00, 0x02];
    const GUEST_IP: [u8; 4] = [172, 16, 0, 2];

    /// Verifies a checksum independently of `checksum`: the one's-complement
    /// sum over the bytes, checksum field included, must fold to 0xffff.
    fn sum_ok(data: &[u8]) -> bool {
        let mut s: u64 = 0;
        for i in (0..data.len()).step_by(2) {
            s += (u64::from(data[i]) << 8) | u64::from(*data.get(i + 1).unwrap_or(&0));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s == 0xffff
    }

    fn arp(op: u16, target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    fn ipv4(proto: u8, src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = GATEWAY_MAC.to_vec();
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + payload.len() as u16).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]); // id, DF, TTL
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        let sum = checksum(&f[14..34]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn syn() -> Vec<u8> {
        // 40000 -> 80, seq 1, data offset 5, SYN, window 64240
        let tcp = [0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0];
        ipv4(6, GUEST_IP, [10, 0, 0, 7], &tcp)
    }

    fn ans(f: &[u8]) -> Option<Vec<u8>> {
        let mut out = [0u8; MAX_FRAME];
        answer(f, &mut out).map(|n| out[..n].to_vec())
    }

    /// Checks every field of the unreachable answer `r` to `f`.
    fn check_unreachable(f: &[u8], r: &[u8]) {
        let quote = &f[14..14 + (f.len() - 14).min(28)];
        assert_eq!(r.len(), 14 + 20 + 8 + quote.len());
        assert_eq!(&r[0..6], &f[6..12]);
        assert_eq!(&r[6..12], &GATEWAY_MAC);
        assert_eq!(&r[12..14], &[0x08, 0x00]);
        let (h, icmp) = r[14..].split_at(20);
        assert_eq!(&h[..10], &[0x45, 0, 0, (r.len() - 14) as u8, 0, 0, 0, 0, 64, 1]);
        assert_eq!(&h[12..16], &GATEWAY_IP);
        assert_eq!(&h[16..20], &f[26..30]);
        assert!(sum_ok(h), "IP header checksum");
        assert_eq!(&icmp[..2], &[3, 13]);
        assert!(sum_ok(icmp), "ICMP checksum");
        assert_eq!(&icmp[4..8], &[0; 4]);
        assert_eq!(&icmp[8..], quote);
    }

    #[test]
    fn arp_for_gateway_is_answered() {
        let r = ans(&arp(1, GATEWAY_IP)).expect("reply");
        assert_eq!(r.len(), 60);
        assert_eq!(&r[0..6], &GUEST_MAC);
        assert_eq!(&r[6..12], &GATEWAY_MAC);
        assert_eq!(&r[12..22], &[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 2]);
        assert_eq!(&r[22..28], &GATEWAY_MAC);
        assert_eq!(&r[28..32], &GATEWAY_IP);
        assert_eq!(&r[32..38], &GUEST_MAC);
        assert_eq!(&r[38..42], &GUEST_IP);
        assert!(r[42..].iter().all(|&b| b == 0));
        assert_eq!(ans(&arp(1, SUBNET_BROADCAST)), None);
        assert_eq!(ans(&arp(2, GATEWAY_IP)), None);
        assert_eq!(ans(&arp(1, GATEWAY_IP)[..41]), None);
    }

    #[test]
    fn tcp_udp_and_echo_are_refused() {
        let f = syn();
        check_unreachable(&f, &ans(&f).expect("SYN answered"));
        let dns = ipv4(17, GUEST_IP, GATEWAY_IP, &[0x9c, 0x41, 0, 53, 0, 20, 0, 0, 0xab, 0xcd, 1, 0]);
        check_unreachable(&dns, &ans(&dns).expect("DNS answered"));
        let mut echo = vec![8, 0, 0, 0, 0, 1, 0, 1];
        echo.extend_from_slice(&[0x5a; 56]);
        let ping = ipv4(1, GUEST_IP, [1, 1, 1, 1], &echo);
        check_unreachable(&ping, &ans(&ping).expect("echo answered"));
        // Ethernet padding after a short datagram is neither read nor quoted.
        let mut udp = ipv4(17, GUEST_IP, [10, 0, 0, 7], &[0, 1, 0, 2, 0, 8, 0, 0]);
        let bare = udp.clone();
        udp.resize(60, 0xee);
        assert_eq!(ans(&udp), ans(&bare));
        check_unreachable(&bare, &ans(&udp).unwrap());
        // A first fragment is answered (offset 0, more-fragments set).
        let mut first = syn();
        first[20] = 0x20;
        assert!(ans(&first).is_some());
    }

    #[test]
    fn silent_cases() {
        let err = ipv4(1, GUEST_IP, [10, 0, 0, 7], &[3, 1, 0, 0, 0, 0, 0, 0]);
        let broadcast = ipv4(17, GUEST_IP, [255; 4], &[0; 8]);
        let subnet_bc = ipv4(17, GUEST_IP, SUBNET_BROADCAST, &[0; 8]);
        let mcast = ipv4(17, GUEST_IP, [224, 0, 0, 251], &[0; 8]);
        let from_zero = ipv4(17, [0; 4], [10, 0, 0, 7], &[0; 8]);
        let mut frag = syn();
        frag[21] = 1;
        let mut v6 = syn();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        let mut long = syn();
        long[17] += 1; // total length one past the bytes present
        let mut small_ihl = syn();
        small_ihl[14] = 0x44;
        let mut eth_bc = syn();
        eth_bc[0..6].copy_from_slice(&[0xff; 6]);
        for f in [err, broadcast, subnet_bc, mcast, from_zero, frag, v6, long, small_ihl, eth_bc] {
            assert_eq!(ans(&f), None, "{f:02x?}");
        }
    }

    #[test]
    fn truncated_frames() {
        let f = syn();
        for n in 0..f.len() {
            // Any cut leaves fewer bytes than the total length says.
            assert_eq!(ans(&f[..n]), None, "prefix of {n}");
        }
        assert!(ans(&f).is_some());
    }

    #[test]
    fn random_frames_never_panic() {
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = [0u8; MAX_FRAME];
        let mut answered = 0;
        for i in 0..20_000 {
            let len = (rnd() % 2000) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            if i % 2 == 1 && len >= 34 {
                // Valid-ish header: IPv4 or ARP, plausible fields, random rest.
                f[0] &= 0xfe;
                if rnd() % 4 == 0 {
                    f[12..22].copy_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
                } else {
                    f[12] = 8;
                    f[13] = 0;
                    f[14] = 0x40 | (rnd() % 16) as u8;
                    let total = (rnd() % (len as u64 - 10)) as u16;
                    f[16..18].copy_from_slice(&total.to_be_bytes());
                    if rnd() % 2 == 0 {
                        f[20] &= 0xe0;
                        f[21] = 0;
                    }
                    f[26..30].copy_from_slice(&GUEST_IP);
                }
            }
            // Sometimes a buffer too small for any answer.
            let olen = if i % 5 == 0 { (rnd() % 80) as usize } else { MAX_FRAME };
            if let Some(n) = answer(&f, &mut out[..olen]) {
                assert!(n <= MAX_FRAME && n <= olen);
                assert_eq!(&out[6..12], &GATEWAY_MAC);
                answered += 1;
            }
        }
        assert!(answered > 100, "the valid-ish frames should often be answered: {answered}");
    }
}
