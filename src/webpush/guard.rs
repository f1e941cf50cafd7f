//! Where Herald may send a push: only to a subscription's endpoint, only over HTTPS, and never to
//! an address on a private network. A subscription names its endpoint, so without this a user
//! could make a node send requests into the network it runs in.
//!
//! Enforced twice. When a subscription is registered, its endpoint is checked by form
//! ([`check_endpoint`]): `https:`, no credentials, a host on `webpush.endpoint_hosts` when that
//! list is set, no IP literal outside public unicast ranges, no name that is local by definition.
//! And on every connection, the HTTP client resolves names through [`PublicResolver`], which drops
//! every non-public address and fails when none is left, so a name that resolved to a public
//! address at registration and to a private one later (DNS rebinding) is refused too. The client
//! follows no redirects and uses no proxy. A development node may allow private endpoints
//! (`webpush.allow_private_endpoints`, refused without `node.dev`), for a push service of its own.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use url::{Host, Url};

/// The longest endpoint accepted (push services' URLs are a few hundred bytes).
pub const MAX_ENDPOINT_BYTES: usize = 2_048;

/// Which endpoints a node accepts.
#[derive(Clone, Debug)]
pub struct EndpointPolicy {
    /// Hosts an endpoint may name (each with the hosts under it); empty: any public host.
    pub hosts: Vec<String>,
    /// Development: `http:`, loopback and private addresses allowed.
    pub allow_private: bool,
}

/// Why an endpoint was refused (the API's 422 says this).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Not a URL.
    #[error("endpoint is not a URL")]
    NotUrl,
    /// Too long.
    #[error("endpoint is longer than {MAX_ENDPOINT_BYTES} bytes")]
    TooLong,
    /// Not https.
    #[error("endpoint must be an https: URL")]
    NotHttps,
    /// Carries a user name or password.
    #[error("endpoint must not carry credentials")]
    Credentials,
    /// A private, loopback, link-local or otherwise non-public address or name.
    #[error(
        "endpoint names a private or local address ({0}); push services are on the public internet"
    )]
    Private(String),
    /// Not a push service this node sends to.
    #[error("endpoint host {0} is not a push service this node sends to (webpush.endpoint_hosts)")]
    HostNotAllowed(String),
}

impl EndpointPolicy {
    /// The endpoint parsed, if this node may send to it.
    ///
    /// # Errors
    /// Why it may not.
    pub fn check_endpoint(&self, endpoint: &str) -> Result<Url, EndpointError> {
        if endpoint.len() > MAX_ENDPOINT_BYTES {
            return Err(EndpointError::TooLong);
        }
        let url = Url::parse(endpoint).map_err(|_| EndpointError::NotUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_private => {}
            _ => return Err(EndpointError::NotHttps),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(EndpointError::Credentials);
        }
        let host = url.host().ok_or(EndpointError::NotUrl)?;
        if self.allow_private {
            return Ok(url);
        }
        let name = match host {
            Host::Ipv4(ip) => return public_ip(IpAddr::V4(ip)).map(|()| url.clone()),
            Host::Ipv6(ip) => return public_ip(IpAddr::V6(ip)).map(|()| url.clone()),
            Host::Domain(name) => name.to_ascii_lowercase(),
        };
        let name = name.trim_end_matches('.');
        if is_local_name(name) {
            return Err(EndpointError::Private(name.to_owned()));
        }
        let listed = self.hosts.is_empty()
            || self.hosts.iter().any(|allowed| {
                let allowed = allowed.trim_end_matches('.').to_ascii_lowercase();
                name == allowed || name.ends_with(&format!(".{allowed}"))
            });
        if !listed {
            return Err(EndpointError::HostNotAllowed(name.to_owned()));
        }
        Ok(url)
    }
}

fn public_ip(ip: IpAddr) -> Result<(), EndpointError> {
    if is_public(ip) {
        Ok(())
    } else {
        Err(EndpointError::Private(ip.to_string()))
    }
}

/// Names that never leave the local network (RFC 6761, 6762, 8375 and common internal suffixes).
fn is_local_name(name: &str) -> bool {
    const LOCAL: [&str; 6] = [
        "localhost",
        "local",
        "internal",
        "home.arpa",
        "lan",
        "intranet",
    ];
    !name.contains('.')
        || LOCAL
            .iter()
            .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
}

/// True for a public unicast address: none of loopback, private (RFC 1918, unique local),
/// link-local, shared (CGNAT), documentation, benchmarking, multicast, reserved or unspecified;
/// an IPv4 address mapped into IPv6 (or NAT64's prefix) is judged as the IPv4 address it carries.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 192 && b == 0 && c == 0))
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [hi, lo] = [s[6].to_be_bytes(), s[7].to_be_bytes()];
        return is_public_v4(Ipv4Addr::new(hi[0], hi[1], lo[0], lo[1]));
    }
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || s[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
}

/// The push client's resolver: the system's, with every non-public address dropped (see the
/// module docs). With `allow_private` it passes everything through.
#[derive(Clone, Copy, Debug)]
pub struct PublicResolver {
    /// Development: keep private addresses.
    pub allow_private: bool,
}

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = found
                .into_iter()
                .filter(|addr| allow_private || is_public(addr.ip()))
                .collect();
            if kept.is_empty() {
                return Err(EndpointError::Private(host).into());
            }
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(hosts: &[&str]) -> EndpointPolicy {
        EndpointPolicy {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            allow_private: false,
        }
    }

    #[test]
    fn only_https_endpoints_of_public_push_services_pass() {
        let any = policy(&[]);
        let listed = policy(&["push.apple.com", "fcm.googleapis.com"]);
        assert!(
            listed
                .check_endpoint("https://web.push.apple.com/QGx")
                .is_ok()
        );
        assert!(
            listed
                .check_endpoint("https://fcm.googleapis.com/fcm/send/x")
                .is_ok()
        );
        assert_eq!(
            listed.check_endpoint("https://evil.example/x"),
            Err(EndpointError::HostNotAllowed("evil.example".into()))
        );
        // A suffix is a whole label, not a string suffix.
        assert!(
            listed
                .check_endpoint("https://notpush.apple.com.evil.example/")
                .is_err()
        );
        assert!(listed.check_endpoint("https://xpush.apple.com/").is_err());
        assert_eq!(
            any.check_endpoint("http://push.example/x"),
            Err(EndpointError::NotHttps)
        );
        assert_eq!(
            any.check_endpoint("ftp://push.example/x"),
            Err(EndpointError::NotHttps)
        );
        assert_eq!(
            any.check_endpoint("https://u:p@push.example/"),
            Err(EndpointError::Credentials)
        );
        assert_eq!(any.check_endpoint("not a url"), Err(EndpointError::NotUrl));
        let long = format!("https://push.example/{}", "a".repeat(MAX_ENDPOINT_BYTES));
        assert_eq!(any.check_endpoint(&long), Err(EndpointError::TooLong));
        for private in [
            "https://127.0.0.1/x",
            "https://10.1.2.3/x",
            "https://172.16.0.1/x",
            "https://192.168.1.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://100.64.0.1/x",
            "https://0.0.0.0/x",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[fe80::1]/x",
            "https://[::ffff:127.0.0.1]/x",
            "https://[64:ff9b::a00:1]/x",
            "https://localhost/x",
            "https://api.localhost/x",
            "https://db.internal/x",
            "https://printer.local/x",
            "https://intranethost/x",
            "https://2130706433/x", // 127.0.0.1 as one number: the URL parser reads it so
        ] {
            assert!(
                matches!(any.check_endpoint(private), Err(EndpointError::Private(_))),
                "{private} must be refused"
            );
        }
        assert!(any.check_endpoint("https://8.8.8.8/x").is_ok());
        assert!(any.check_endpoint("https://[2606:4700::1111]/x").is_ok());
    }

    #[test]
    fn a_development_node_may_name_its_own_push_service() {
        let dev = EndpointPolicy {
            hosts: vec!["push.apple.com".into()],
            allow_private: true,
        };
        assert!(dev.check_endpoint("http://127.0.0.1:9000/push/1").is_ok());
        assert!(dev.check_endpoint("ftp://127.0.0.1/").is_err());
    }

    #[tokio::test]
    async fn the_resolver_drops_private_addresses_and_fails_when_none_is_left() {
        let strict = PublicResolver {
            allow_private: false,
        };
        let name: Name = "localhost".parse().unwrap();
        assert!(strict.resolve(name).await.is_err());
        let dev = PublicResolver {
            allow_private: true,
        };
        let name: Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = dev.resolve(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }
}
