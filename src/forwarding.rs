//! Forwarding headers on passthrough requests (SPEC §7b): the upstream learns who the client
//! is (`X-Forwarded-For`) and how it reached us (`X-Forwarded-Proto`).
//!
//! A client can write any header, so `X-Forwarded-*` it sends are believed only from
//! `trusted_proxies` (a load balancer or CDN in front of us, which appends to them). From
//! anyone else they are removed before ours are set, so an origin that trusts the gateway
//! never sees a forged client address.

use std::net::IpAddr;
use std::str::FromStr;

use http::{HeaderMap, HeaderName, HeaderValue};

const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const PREFIX: &str = "x-forwarded-";

/// An IP network such as `10.0.0.0/8` or `fd00::/8`; a bare address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a
    /// dual-stack listener reports for IPv4 clients) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn same_prefix(a: u128, b: u128, bits: u32, prefix: u8) -> bool {
            prefix == 0 || (a ^ b) >> (bits - u32::from(prefix)) == 0
        }
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                same_prefix(u32::from(n).into(), u32::from(a).into(), 32, self.prefix)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                same_prefix(u128::from(n), u128::from(a), 128, self.prefix)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not an IP address or network like 10.0.0.0/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let network: IpAddr = addr.trim().parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(bad)?,
            None => max,
        };
        Ok(Cidr {
            network: network.to_canonical(),
            prefix,
        })
    }
}

/// Sets the forwarding headers of a request about to go upstream (two headers at most).
/// `peer` is the address the connection came from; `https` whether it arrived over
/// TLS.
pub fn apply(headers: &mut HeaderMap, peer: Option<IpAddr>, trusted: &[Cidr], https: bool) {
    let from_trusted = peer.is_some_and(|ip| trusted.iter().any(|c| c.contains(ip)));
    let sent_for = if from_trusted {
        let values: Vec<&str> = headers
            .get_all(&FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    } else {
        let forged: Vec<_> = headers
            .keys()
            .filter(|name| name.as_str().starts_with(PREFIX))
            .cloned()
            .collect();
        for name in forged {
            headers.remove(&name);
        }
        None
    };
    let client = peer.map_or_else(|| "unknown".to_string(), |ip| text(ip.to_canonical()));
    let value = match sent_for {
        Some(chain) => format!("{chain}, {client}"),
        None => client,
    };
    // An address, a comma and spaces: always a valid header value.
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(FOR, value);
    }
    // A trusted proxy in front knows the client's scheme better than we do.
    if !(from_trusted && headers.contains_key(&PROTO)) {
        let proto = if https { "https" } else { "http" };
        headers.insert(PROTO, HeaderValue::from_static(proto));
    }
}

/// An address as `Display` writes it; IPv4, the common case, without the formatting
/// machinery (a tenth of the instructions, on every passthrough request).
fn text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut out = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        out.push_str(digits.format(octet));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    proptest::proptest! {
        #[test]
        fn addresses_read_as_display_writes_them(bits: u32, v6: u128) {
            for ip in [IpAddr::from(bits.to_be_bytes()), IpAddr::from(v6.to_be_bytes())] {
                proptest::prop_assert_eq!(text(ip), ip.to_string());
            }
        }
    }

    #[test]
    fn networks() {
        let ten = cidr("10.0.0.0/8");
        assert!(ten.contains(ip("10.255.1.2")));
        assert!(!ten.contains(ip("11.0.0.1")));
        assert!(ten.contains(ip("::ffff:10.1.2.3")));
        assert!(!ten.contains(ip("fd00::1")));
        assert!(cidr("192.168.1.7").contains(ip("192.168.1.7")));
        assert!(!cidr("192.168.1.7").contains(ip("192.168.1.8")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(cidr("fd00::/8").contains(ip("fdab::1")));
        assert!(!cidr("fd00::/8").contains(ip("fe80::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
        assert!(
            cidr("10.1.2.3/16").contains(ip("10.1.9.9")),
            "host bits ignored"
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "host/8",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    fn request(headers: &[(&str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::try_from(*k).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        map
    }

    fn values(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn untrusted_clients_cannot_forge_forwarding_headers() {
        let mut req = request(&[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Other", "kept"),
        ]);
        apply(
            &mut req,
            Some(ip("203.0.113.9")),
            &[cidr("10.0.0.0/8")],
            false,
        );
        assert_eq!(values(&req, FOR), ["203.0.113.9"]);
        assert_eq!(values(&req, PROTO), ["http"]);
        assert!(!req.contains_key("x-forwarded-host"));
        assert_eq!(req["x-other"], "kept");
    }

    #[test]
    fn trusted_proxies_are_appended_to() {
        let trusted = [cidr("10.0.0.0/8")];
        let mut req = request(&[
            ("X-Forwarded-For", "1.2.3.4"),
            ("X-Forwarded-For", "5.6.7.8"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "app.example"),
        ]);
        apply(&mut req, Some(ip("::ffff:10.0.0.2")), &trusted, false);
        assert_eq!(values(&req, FOR), ["1.2.3.4, 5.6.7.8, 10.0.0.2"]);
        assert_eq!(values(&req, PROTO), ["https"]);
        assert_eq!(req["x-forwarded-host"], "app.example");

        let mut req = request(&[]);
        apply(&mut req, Some(ip("10.0.0.2")), &trusted, true);
        assert_eq!(values(&req, FOR), ["10.0.0.2"]);
        assert_eq!(values(&req, PROTO), ["https"]);
    }
}
