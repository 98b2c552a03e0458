//! The SSRF guard: which addresses a delivery may connect to.
//!
//! Two checks, both at send time: a [`reqwest::dns::Resolve`] implementation that drops every
//! resolved address the policy refuses (so a name that resolves to `127.0.0.1` is refused when
//! the connection is made, not when the subscription was created — DNS can change), and a check
//! of IP-literal hosts, which reqwest connects to without calling the resolver.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::DispatchError;

/// An IP network in CIDR form (`10.0.0.0/8`, `fd00::/8`, or a bare address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// True when `ip` lies in the network (IPv4-mapped IPv6 addresses count as IPv4).
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = DispatchError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DispatchError::Invalid(format!("`{s}` is not an IP network like 10.0.0.0/8"));
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(IpAddr::from_str(addr).map_err(|_| bad())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Which targets deliveries may connect to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Allow every address, private ones included.
    pub allow_private: bool,
    /// Networks allowed even though they are not public.
    pub allowed: Vec<IpNet>,
}

impl TargetPolicy {
    /// True when a connection to `ip` is allowed.
    #[must_use]
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip) || self.allowed.iter().any(|n| n.contains(ip))
    }

    /// `Err` with the reason when `ip` is refused.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allows(ip) {
            Ok(())
        } else {
            Err(format!(
                "refused to connect to {ip}: not a public address (set allow_private_targets or allow its subnet)"
            ))
        }
    }

    /// Checks the host of `url` when it is an IP literal (reqwest does not resolve those).
    pub fn check_url_host(&self, url: &reqwest::Url) -> Result<(), String> {
        match literal_host(url) {
            Some(ip) => self.check(ip),
            None => Ok(()),
        }
    }
}

/// The URL's host as an address, when it is an IP literal.
pub(crate) fn literal_host(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    IpAddr::from_str(host).ok()
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible addresses as IPv4; others unchanged.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// True for globally routable unicast addresses: not private, loopback, link-local, CGNAT,
/// multicast, documentation, benchmarking, reserved, unspecified or broadcast (IPv4); not
/// loopback, unspecified, ULA, link-local, site-local, multicast, documentation, discard,
/// IETF-protocol (Teredo…) or IPv4-compatible (IPv6), with IPv4 embedded in IPv4-mapped,
/// NAT64 and 6to4 addresses judged as IPv4.
#[must_use]
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    let forbidden = a == 0                                  // "this network", 0.0.0.0
        || a == 10                                          // private
        || a == 127                                         // loopback
        || (a == 100 && (64..128).contains(&b))             // CGNAT 100.64/10
        || (a == 169 && b == 254)                           // link-local (cloud metadata)
        || (a == 172 && (16..32).contains(&b))              // private
        || (a == 192 && b == 0 && c == 0)                   // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)                   // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)                 // 6to4 relay anycast
        || (a == 192 && b == 168)                           // private
        || (a == 198 && (18..20).contains(&b))              // benchmarking
        || (a == 198 && b == 51 && c == 100)                // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)                 // TEST-NET-3
        || a >= 224; // multicast 224/4, reserved 240/4, broadcast
    !forbidden
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    // NAT64 well-known prefix 64:ff9b::/96 embeds an IPv4 address.
    if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0, 0, 0, 0] {
        let [.., hi, lo] = seg;
        return is_public_v4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
    }
    // 6to4 2002::/16 embeds an IPv4 address in segments 1-2.
    if seg[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::from(
            (u32::from(seg[1]) << 16) | u32::from(seg[2]),
        ));
    }
    let forbidden = ip.is_unspecified()
        || ip.is_loopback()
        || seg[0..6] == [0, 0, 0, 0, 0, 0]                  // IPv4-compatible ::a.b.c.d
        || (seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1) // local-use NAT64 64:ff9b:1::/48
        || (seg[0] == 0x100 && seg[1..4] == [0, 0, 0])      // discard 100::/64
        || (seg[0] == 0x2001 && seg[1] < 0x200)             // IETF protocols 2001::/23 (Teredo…)
        || (seg[0] == 0x2001 && seg[1] == 0xdb8)            // documentation
        || (seg[0] & 0xfff0) == 0x3ff0                      // documentation 3fff::/20
        || (seg[0] & 0xfe00) == 0xfc00                      // unique local fc00::/7
        || (seg[0] & 0xffc0) == 0xfe80                      // link-local fe80::/10
        || (seg[0] & 0xffc0) == 0xfec0                      // site-local fec0::/10
        || (seg[0] & 0xff00) == 0xff00; // multicast
    !forbidden
}

/// A resolver that drops every address the policy refuses, and fails when none is left.
#[derive(Clone, Debug)]
pub(crate) struct GuardedResolver {
    policy: Arc<TargetPolicy>,
}

impl GuardedResolver {
    pub(crate) fn new(policy: Arc<TargetPolicy>) -> Self {
        Self { policy }
    }
}

/// The resolver's refusal, shown in the attempt's `error`.
#[derive(Debug, thiserror::Error)]
#[error("refused to connect to `{host}`: it resolves only to non-public addresses ({addrs}); set allow_private_targets or allow the subnet")]
struct Refused {
    host: String,
    addrs: String,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                let addrs = resolved
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(Box::new(Refused { host, addrs }) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for s in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "::1",
            "0.0.0.0",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:7f00:1::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001::1",
            "3fff::1",
            "100::1",
        ] {
            assert!(!is_public(ip(s)), "{s} should be refused");
            assert!(TargetPolicy::default().check(ip(s)).is_err(), "{s}");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.1",
            "172.15.0.1",
            "172.32.0.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2a00:1450:4001::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(ip(s)), "{s} should be allowed");
        }
    }

    #[test]
    fn policy_exceptions() {
        let everything = TargetPolicy {
            allow_private: true,
            allowed: vec![],
        };
        assert!(everything.allows(ip("127.0.0.1")));
        let subnet = TargetPolicy {
            allow_private: false,
            allowed: vec!["10.1.0.0/16".parse().unwrap(), "fd00::/8".parse().unwrap()],
        };
        assert!(subnet.allows(ip("10.1.2.3")));
        assert!(subnet.allows(ip("::ffff:10.1.2.3")));
        assert!(!subnet.allows(ip("10.2.0.1")));
        assert!(subnet.allows(ip("fd00::5")));
        assert!(!subnet.allows(ip("fc00::5")));
        assert!(!subnet.allows(ip("127.0.0.1")));
    }

    #[test]
    fn networks_parse() {
        assert_eq!(
            "10.0.0.0/8".parse::<IpNet>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "127.0.0.1".parse::<IpNet>().unwrap().to_string(),
            "127.0.0.1/32"
        );
        assert!("0.0.0.0/0"
            .parse::<IpNet>()
            .unwrap()
            .contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn literal_hosts_are_found() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        assert_eq!(
            literal_host(&u("http://127.0.0.1:8080/x")),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(literal_host(&u("http://[::1]/x")), Some(ip("::1")));
        // WHATWG URL parsing normalises odd IPv4 spellings.
        assert_eq!(
            literal_host(&u("http://2130706433/")),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(literal_host(&u("http://0x7f.1/")), Some(ip("127.0.0.1")));
        assert_eq!(literal_host(&u("http://example.com/")), None);
        assert!(TargetPolicy::default()
            .check_url_host(&u("http://[::ffff:7f00:1]/"))
            .is_err());
    }

    #[tokio::test]
    async fn resolver_drops_loopback() {
        let r = GuardedResolver::new(Arc::new(TargetPolicy::default()));
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("refused"), "{err}");
        let open = GuardedResolver::new(Arc::new(TargetPolicy {
            allow_private: true,
            allowed: vec![],
        }));
        let addrs: Vec<_> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
