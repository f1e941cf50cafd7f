//! The origin check of WebSocket upgrades, in Phoenix's manner (`check_origin`): a browser says
//! which page opened the socket (`Origin`), and a node that lists allowed origins refuses the
//! others with 403 before the upgrade, so another site's page cannot open sockets with a user's
//! token. Clients that send no `Origin` (servers, mobile apps) are not browsers and pass.
//!
//! A pattern is `scheme://host[:port]`, or `//host[:port]` for any scheme; a host `*.example.com`
//! matches every subdomain of example.com (not example.com itself); without a port any port
//! matches. Pure: parsing and matching only.

/// One allowed origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
}

impl OriginPattern {
    /// Parses a pattern from `socket.check_origin`.
    ///
    /// # Errors
    /// Not of the form `scheme://host[:port]` or `//host[:port]`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let origin =
            Origin::parse(pattern).ok_or_else(|| format!("{pattern:?} is not an origin"))?;
        Ok(Self {
            scheme: origin.scheme.map(str::to_ascii_lowercase),
            host: origin.host.to_ascii_lowercase(),
            port: origin.port,
        })
    }

    fn matches(&self, origin: &Origin<'_>) -> bool {
        let scheme = match (&self.scheme, origin.scheme) {
            (None, _) => true,
            (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
            (Some(_), None) => false,
        };
        let host = match self.host.strip_prefix("*.") {
            Some(domain) => origin
                .host
                .len()
                .checked_sub(domain.len() + 1)
                .and_then(|cut| origin.host.get(cut..))
                .is_some_and(|tail| {
                    tail.starts_with('.') && tail[1..].eq_ignore_ascii_case(domain)
                }),
            None => origin.host.eq_ignore_ascii_case(&self.host),
        };
        scheme && host && self.port.is_none_or(|port| Some(port) == origin.port)
    }
}

/// True when a request with this `Origin` header may upgrade: any origin when `allowed` is empty,
/// no header at all (not a browser), or a header matching one pattern.
pub fn allowed(origin: Option<&str>, allowed: &[OriginPattern]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = origin else { return true };
    Origin::parse(origin).is_some_and(|origin| allowed.iter().any(|p| p.matches(&origin)))
}

/// An origin as browsers send it: `scheme://host[:port]`.
struct Origin<'a> {
    scheme: Option<&'a str>,
    host: &'a str,
    port: Option<u16>,
}

impl<'a> Origin<'a> {
    fn parse(text: &'a str) -> Option<Self> {
        let (scheme, rest) = match text.split_once("//") {
            Some(("", rest)) => (None, rest),
            Some((scheme, rest)) => (Some(scheme.strip_suffix(':')?), rest),
            None => return None,
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (authority, None),
        };
        if host.is_empty() || scheme.is_some_and(str::is_empty) {
            return None;
        }
        Some(Self { scheme, host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns(list: &[&str]) -> Vec<OriginPattern> {
        list.iter()
            .map(|p| OriginPattern::parse(p).unwrap())
            .collect()
    }

    #[test]
    fn an_empty_list_and_a_missing_header_allow_anything() {
        assert!(allowed(Some("https://evil.example"), &[]));
        assert!(allowed(None, &patterns(&["https://app.example.com"])));
    }

    #[test]
    fn scheme_host_and_port_must_match_where_given() {
        let list = patterns(&[
            "https://app.example.com",
            "//*.example.org",
            "http://localhost:4000",
        ]);
        assert!(allowed(Some("https://app.example.com"), &list));
        assert!(allowed(Some("HTTPS://APP.example.com:8443"), &list));
        assert!(!allowed(Some("http://app.example.com"), &list));
        assert!(!allowed(Some("https://app.example.com.evil.net"), &list));
        assert!(allowed(Some("http://a.b.example.org"), &list));
        assert!(!allowed(Some("https://example.org"), &list));
        assert!(!allowed(Some("https://evilexample.org"), &list));
        assert!(allowed(Some("http://localhost:4000"), &list));
        assert!(!allowed(Some("http://localhost:4001"), &list));
        assert!(!allowed(Some("null"), &list));
    }

    #[test]
    fn patterns_that_are_not_origins_are_refused() {
        for bad in ["example.com", "https://", "https://host:port", "://host"] {
            assert!(OriginPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
