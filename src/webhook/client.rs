//! The outbound HTTP client for webhook deliveries, and the checks that keep it from being
//! pointed inside the network it runs in (SSRF).
//!
//! Whoever registers a webhook chooses the URL this service will POST to, so without checks the
//! service would fetch its cloud metadata endpoint or an internal admin page on their behalf.
//! Two checks close that: [`check_url`] refuses bad URLs when a webhook is registered (a 400 with
//! a reason), and the [`Client`] refuses, at connect time, any address outside the public unicast
//! ranges. Host names are checked by the client's own resolver, which hands the connector only
//! the addresses it checked, so a name that resolves to a public address when registered and to
//! 127.0.0.1 later (DNS rebinding) is still refused. URLs with a literal IP never reach a
//! resolver, so [`Client::post`] checks those again itself. Redirects are not followed (each hop
//! would be a new, unchecked target) and proxies from the environment are not used (a proxy
//! resolves the name itself, past our resolver).
//!
//! `--webhook-allow-private` (`allow_private`) turns the address checks off, for receivers on a
//! private network or the same host.

use std::error::Error as _;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::{StatusCode, Url, redirect};

/// The longest URL accepted: longer ones are more likely abuse than an endpoint, and some
/// servers and proxies refuse them anyway.
pub const MAX_URL_BYTES: usize = 2048;
/// How much of a receiver's answer is read: enough for an error message, never an unbounded
/// body.
pub const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// The longest a receiver can ask us to wait with `Retry-After`; past this the delivery schedule
/// decides again rather than trusting a far-off date.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60 * 60);
/// Connecting gives up after this long even when the whole request may take longer: an address
/// that does not answer a SYN in this time is unreachable, not slow.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a refusal's body goes into its reason.
const REASON_CHARS: usize = 200;
const USER_AGENT: &str = concat!("event-piper/", env!("CARGO_PKG_VERSION"));

/// Why a webhook URL is refused. The message is one line, shown to the API client with a 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("url: is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    #[error("url: not a valid absolute URL ({0})")]
    Invalid(String),
    #[error("url: the scheme must be http or https, not {0:?}")]
    Scheme(String),
    #[error("url: has no host")]
    NoHost,
    #[error("url: must not contain a user name or password (they would end up in logs)")]
    UserInfo,
    #[error("url: {0}; only public addresses are allowed (see --webhook-allow-private)")]
    Address(RefusedAddress),
    #[error(
        "url: {0:?} names this machine; only public addresses are allowed \
         (see --webhook-allow-private)"
    )]
    Localhost(String),
}

/// An address outside the public unicast ranges, and which range it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefusedAddress {
    pub ip: IpAddr,
    /// Such as "loopback", "private" or "link-local".
    pub range: &'static str,
}

impl fmt::Display for RefusedAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address {} refused ({})", self.ip, self.range)
    }
}

impl RefusedAddress {
    /// `Some` when `ip` is not a public unicast address.
    pub fn check(ip: IpAddr) -> Option<RefusedAddress> {
        let range = match ip {
            IpAddr::V4(ip) => v4_range(ip),
            IpAddr::V6(ip) => v6_range(ip),
        }?;
        Some(RefusedAddress { ip, range })
    }
}

/// IPv4 ranges that are not public unicast (IANA special-purpose registry), most specific first:
/// the first match names the range.
const REFUSED_V4: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 32, "unspecified"),
    (Ipv4Addr::new(255, 255, 255, 255), 32, "broadcast"),
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\""),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared address space (CGNAT)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local"),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments"),
    (Ipv4Addr::new(192, 0, 2, 0), 24, "documentation"),
    (Ipv4Addr::new(192, 88, 99, 0), 24, "6to4 relay anycast"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking"),
    (Ipv4Addr::new(198, 51, 100, 0), 24, "documentation"),
    (Ipv4Addr::new(203, 0, 113, 0), 24, "documentation"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved"),
];

fn v4_range(ip: Ipv4Addr) -> Option<&'static str> {
    let ip = u32::from(ip);
    REFUSED_V4
        .iter()
        .find(|(network, bits, _)| {
            let mask = u32::MAX << (32 - u32::from(*bits));
            ip & mask == u32::from(*network)
        })
        .map(|(_, _, range)| *range)
}

/// IPv6: only global unicast (2000::/3) is public, less the special blocks inside it. Addresses
/// that carry an IPv4 address a router would reach (mapped, NAT64, 6to4) are judged by it, or
/// `[::ffff:127.0.0.1]` would be a way around the IPv4 rules.
fn v6_range(ip: Ipv6Addr) -> Option<&'static str> {
    let bits = u128::from(ip);
    let within = |network: u128, len: u32| bits >> (128 - len) == network >> (128 - len);
    let embedded = |shift: u32| Ipv4Addr::from((bits >> shift) as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return v4_range(v4);
    }
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    if within(0x0064_ff9b << 96, 96) {
        // NAT64, well-known prefix: the last 32 bits are the IPv4 destination.
        return v4_range(embedded(0));
    }
    if within(0x2002 << 112, 16) {
        // 6to4: bits 16 to 47 are the IPv4 address of the tunnel's end.
        return v4_range(embedded(80));
    }
    let range = if within(0xff << 120, 8) {
        "multicast"
    } else if within(0xfe80 << 112, 10) {
        "link-local"
    } else if within(0xfc << 120, 7) {
        "unique local"
    } else if !within(0x2 << 124, 3) {
        // Everything else outside 2000::/3, including the deprecated site-local fec0::/10,
        // IPv4-compatible ::/96, discard-only 100::/64 and local-use NAT64 64:ff9b:1::/48.
        "reserved"
    } else if within(0x2001_0db8 << 96, 32) || within(0x3fff << 112, 20) {
        "documentation"
    } else if within(0x2001_0002 << 96, 48) {
        "benchmarking"
    } else if within(0x2001 << 112, 23) {
        // Teredo, ORCHID and other protocol blocks: nothing a webhook receiver would listen on.
        "IETF protocol assignments"
    } else {
        return None;
    };
    Some(range)
}

/// The IP address of a URL whose host is one, as the `url` crate writes it (IPv6 in brackets,
/// IPv4 already normalized from forms such as `0x7f.1` or `2130706433`).
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        None => host.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// `localhost` and its subdomains resolve to loopback (RFC 6761); refusing the name gives a clear
/// 400 instead of a delivery that fails later.
fn is_localhost(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    host == "localhost" || host.ends_with(".localhost")
}

/// Checks a webhook URL before it is stored: an absolute http(s) URL with a host, no user
/// name or password, at most [`MAX_URL_BYTES`], and, unless `allow_private`, no literal address
/// outside the public unicast ranges and no `localhost`. Host names are not resolved here: the
/// client's resolver checks what they resolve to on every connection.
pub fn check_url(url: &str, allow_private: bool) -> Result<Url, UrlError> {
    if url.len() > MAX_URL_BYTES {
        return Err(UrlError::TooLong(url.len()));
    }
    let parsed = Url::parse(url).map_err(|e| UrlError::Invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(parsed.scheme().to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::UserInfo);
    }
    let host = match parsed.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(UrlError::NoHost),
    };
    // Parsing percent-encodes what needs it, so the stored form can be longer than the input.
    if parsed.as_str().len() > MAX_URL_BYTES {
        return Err(UrlError::TooLong(parsed.as_str().len()));
    }
    if !allow_private {
        if let Some(refused) = literal_ip(&parsed).and_then(RefusedAddress::check) {
            return Err(UrlError::Address(refused));
        }
        if is_localhost(host) {
            return Err(UrlError::Localhost(host.to_owned()));
        }
    }
    Ok(parsed)
}

/// How the [`Client`] behaves.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The whole request: connecting, sending, and reading the response.
    pub timeout: Duration,
    /// At most this much of a response body is read; the rest is left unread and the connection
    /// closed.
    pub max_response_bytes: usize,
    /// Connect to any address, not only public unicast ones.
    pub allow_private: bool,
}

/// What became of one POST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx: the receiver has the batch.
    Delivered { status: u16 },
    /// 410 Gone: the receiver asks never to be sent to again.
    Gone,
    /// Any other status, 3xx included since redirects are not followed. `retry_after` is the
    /// receiver's `Retry-After`, at most [`MAX_RETRY_AFTER`].
    Refused {
        status: u16,
        retry_after: Option<Duration>,
        reason: String,
    },
    /// No response: a timeout, a connection error, a refused address. `reason` is one line.
    Failed { reason: String },
}

/// The HTTP client every delivery goes through; cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    settings: ClientSettings,
}

impl Client {
    /// Fails only if the TLS backend cannot be set up.
    pub fn new(settings: ClientSettings) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .redirect(redirect::Policy::none())
            .no_proxy()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(MAX_CONNECT_TIMEOUT))
            .dns_resolver(Arc::new(CheckingResolver {
                allow_private: settings.allow_private,
            }))
            .build()?;
        Ok(Client { http, settings })
    }

    /// [`check_url`] with this client's `allow_private`.
    pub fn check_url(&self, url: &str) -> Result<Url, UrlError> {
        check_url(url, self.settings.allow_private)
    }

    /// POSTs `body` as `application/json` with `headers` to `url`, once; retrying is the
    /// caller's decision.
    pub async fn post(
        &self,
        url: &Url,
        headers: &[(&'static str, String)],
        body: Bytes,
    ) -> Outcome {
        if !self.settings.allow_private
            && let Some(refused) = literal_ip(url).and_then(RefusedAddress::check)
        {
            return Outcome::Failed {
                reason: refused.to_string(),
            };
        }
        let mut request = self
            .http
            .post(url.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                return Outcome::Failed {
                    reason: self.describe(error),
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let location = location(response.headers());
        // Read even an accepted response's body (up to the limit) so the connection can be
        // reused; what it says does not change the outcome.
        let body = read_limited(&mut response, self.settings.max_response_bytes).await;
        if status.is_success() {
            Outcome::Delivered {
                status: status.as_u16(),
            }
        } else if status == StatusCode::GONE {
            Outcome::Gone
        } else {
            Outcome::Refused {
                status: status.as_u16(),
                retry_after,
                reason: refusal_reason(status, location.as_deref(), &body),
            }
        }
    }

    /// One line on why a request got no response. The URL is left out (its query may hold a
    /// token) and so are reqwest's wrappers, which say only "error sending request".
    fn describe(&self, error: reqwest::Error) -> String {
        let error = error.without_url();
        if error.is_timeout() {
            let after = humantime::format_duration(if error.is_connect() {
                self.settings.timeout.min(MAX_CONNECT_TIMEOUT)
            } else {
                self.settings.timeout
            });
            return if error.is_connect() {
                format!("connecting timed out after {after}")
            } else {
                format!("timed out after {after}")
            };
        }
        let mut innermost: &(dyn std::error::Error + 'static) = &error;
        let mut source = error.source();
        while let Some(cause) = source {
            if let Some(resolve) = cause.downcast_ref::<ResolveError>() {
                return resolve.to_string();
            }
            if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                    std::io::ErrorKind::ConnectionReset => return "connection reset".into(),
                    _ => {}
                }
            }
            innermost = cause;
            source = cause.source();
        }
        let what = if error.is_builder() {
            "building the request"
        } else if error.is_connect() {
            "connecting"
        } else {
            "sending the request"
        };
        one_line(&format!("{what}: {innermost}"), usize::MAX)
    }
}

/// Reads at most `limit` bytes of the body, a chunk at a time; stops early at the limit, at the
/// end, or on an error (what was read is kept). The rest is never read: dropping the response
/// closes the connection.
async fn read_limited(response: &mut reqwest::Response, limit: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// `Retry-After` as delta-seconds or an HTTP-date, capped at [`MAX_RETRY_AFTER`]; a date already
/// past is zero. Unreadable values are ignored.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Too many digits for a u64 is still "a long time".
        Duration::from_secs(value.parse().unwrap_or(u64::MAX))
    } else {
        let date = httpdate::parse_http_date(value).ok()?;
        date.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

fn location(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(LOCATION)?;
    Some(one_line(
        &String::from_utf8_lossy(value.as_bytes()),
        REASON_CHARS,
    ))
}

/// "HTTP 503: <the start of the body>", or for a redirect where it pointed.
fn refusal_reason(status: StatusCode, location: Option<&str>, body: &[u8]) -> String {
    let code = status.as_u16();
    if status.is_redirection() {
        return match location {
            Some(to) => format!("HTTP {code}: redirect to {to} not followed"),
            None => format!("HTTP {code}: redirects are not followed"),
        };
    }
    let text = one_line(&String::from_utf8_lossy(body), REASON_CHARS);
    if text.is_empty() {
        format!("HTTP {code}")
    } else {
        format!("HTTP {code}: {text}")
    }
}

/// `text` with runs of whitespace and control characters as one space, trimmed, and cut to
/// `max_chars` characters: a receiver's HTML error page or a multi-line error becomes one line
/// for the delivery log.
fn one_line(text: &str, max_chars: usize) -> String {
    let mut line = String::new();
    for word in text
        .split(|c: char| c.is_whitespace() || c.is_control())
        .filter(|w| !w.is_empty())
    {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    match line.char_indices().nth(max_chars) {
        Some((cut, _)) => line[..cut].to_owned(),
        None => line,
    }
}

/// Resolves with the system resolver (through tokio) and hands the connector only the addresses
/// that pass [`RefusedAddress::check`]: the address checked is the address connected to.
#[derive(Debug)]
struct CheckingResolver {
    allow_private: bool,
}

/// Why a host name gave no address to connect to; found again in the connect error's sources to
/// give [`Outcome::Failed`] its reason.
#[derive(Debug, thiserror::Error)]
enum ResolveError {
    #[error("could not resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error("{host}: {refused}")]
    Refused {
        host: String,
        refused: RefusedAddress,
    },
}

impl Resolve for CheckingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow_private = self.allow_private;
        Box::pin(async move {
            // Port 0: the connector puts the URL's port in.
            let resolved = match tokio::net::lookup_host((host.clone(), 0)).await {
                Ok(addresses) => addresses.collect(),
                Err(source) => return Err(ResolveError::Lookup { host, source }.into()),
            };
            let kept = usable(host, resolved, allow_private)?;
            Ok(Box::new(kept.into_iter()) as Addrs)
        })
    }
}

/// The addresses the connector may use: all of them if `allow_private`, else the public ones.
/// Public addresses mixed with refused ones leave the public ones; none at all is an error.
fn usable(
    host: String,
    resolved: Vec<SocketAddr>,
    allow_private: bool,
) -> Result<Vec<SocketAddr>, ResolveError> {
    let mut refused = None;
    let kept: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|address| match RefusedAddress::check(address.ip()) {
            Some(reason) if !allow_private => {
                refused.get_or_insert(reason);
                false
            }
            _ => true,
        })
        .collect();
    if !kept.is_empty() {
        return Ok(kept);
    }
    Err(match refused {
        Some(refused) => ResolveError::Refused { host, refused },
        None => ResolveError::NoAddress { host },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(ip: &str) -> Option<&'static str> {
        RefusedAddress::check(ip.parse().unwrap()).map(|r| r.range)
    }

    #[test]
    fn public_unicast_addresses_pass() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.215.14",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.169.0.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2a00:1450:4001:82a::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(range(ip), None, "{ip}");
        }
    }

    #[test]
    fn every_special_range_is_refused_and_named() {
        for (ip, expected) in [
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "\"this network\""),
            ("10.0.0.1", "private"),
            ("10.255.255.255", "private"),
            ("100.64.0.1", "shared address space (CGNAT)"),
            ("100.127.255.255", "shared address space (CGNAT)"),
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("169.254.169.254", "link-local"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.0.0.8", "IETF protocol assignments"),
            ("192.0.2.1", "documentation"),
            ("192.88.99.1", "6to4 relay anycast"),
            ("192.168.1.1", "private"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("198.51.100.7", "documentation"),
            ("203.0.113.9", "documentation"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("240.0.0.1", "reserved"),
            ("255.255.255.254", "reserved"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.1.2.3", "private"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("2002:7f00:1::", "loopback"),
            ("2002:c0a8:101::1", "private"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fc00::1", "unique local"),
            ("fd12:3456:789a::1", "unique local"),
            ("ff02::1", "multicast"),
            ("fec0::1", "reserved"),
            ("::127.0.0.1", "reserved"),
            ("100::1", "reserved"),
            ("64:ff9b:1::1", "reserved"),
            ("2001:db8::1", "documentation"),
            ("3fff::1", "documentation"),
            ("2001:2::1", "benchmarking"),
            ("2001::1", "IETF protocol assignments"),
            ("4000::1", "reserved"),
        ] {
            assert_eq!(range(ip), Some(expected), "{ip}");
        }
    }

    #[test]
    fn check_url_accepts_public_http_and_https() {
        for url in [
            "https://example.com/hooks/events",
            "http://example.com:8080/hook?token=abc",
            "https://8.8.8.8/hook",
            "https://[2606:4700:4700::1111]/hook",
            "https://sub.example.localhost.com/",
        ] {
            let checked = check_url(url, false).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(checked.as_str().starts_with("http"), "{checked}");
        }
    }

    #[test]
    fn check_url_refuses_what_is_not_a_public_http_url() {
        let cases: &[(&str, UrlError)] = &[
            ("ftp://example.com/", UrlError::Scheme("ftp".into())),
            ("file:///etc/passwd", UrlError::Scheme("file".into())),
            ("https://user:pw@example.com/", UrlError::UserInfo),
            ("https://user@example.com/", UrlError::UserInfo),
            (
                "https://localhost/",
                UrlError::Localhost("localhost".into()),
            ),
            (
                "http://LOCALHOST./",
                UrlError::Localhost("localhost.".into()),
            ),
            (
                "http://api.localhost:3000/",
                UrlError::Localhost("api.localhost".into()),
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(check_url(url, false).as_ref(), Err(expected), "{url}");
        }
        assert!(matches!(
            check_url("/relative/path", false),
            Err(UrlError::Invalid(_))
        ));
        assert!(matches!(
            check_url("https://exa mple.com/", false),
            Err(UrlError::Invalid(_))
        ));
        let long = format!("https://example.com/{}", "a".repeat(2048));
        assert_eq!(check_url(&long, false), Err(UrlError::TooLong(long.len())));
    }

    #[test]
    fn check_url_refuses_literal_private_addresses_in_any_spelling() {
        for (url, ip, range) in [
            ("http://10.0.0.1/", "10.0.0.1", "private"),
            (
                "http://169.254.169.254/latest/meta-data/",
                "169.254.169.254",
                "link-local",
            ),
            ("http://127.0.0.1:8080/", "127.0.0.1", "loopback"),
            ("http://[::1]/", "::1", "loopback"),
            ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "loopback"),
            ("http://[fe80::1]/", "fe80::1", "link-local"),
            ("http://0.0.0.0/", "0.0.0.0", "unspecified"),
            // The URL parser normalizes these to 127.0.0.1 before the check sees them.
            ("http://2130706433/", "127.0.0.1", "loopback"),
            ("http://0x7f.1/", "127.0.0.1", "loopback"),
            ("http://127.1/", "127.0.0.1", "loopback"),
            ("http://127.0.0.1./", "127.0.0.1", "loopback"),
        ] {
            let expected = UrlError::Address(RefusedAddress {
                ip: ip.parse().unwrap(),
                range,
            });
            assert_eq!(check_url(url, false), Err(expected), "{url}");
            assert!(check_url(url, true).is_ok(), "{url} with allow_private");
        }
        assert!(check_url("http://localhost:3000/", true).is_ok());
    }

    #[test]
    fn url_errors_are_one_line_with_the_reason() {
        let error = check_url("http://169.254.169.254/", false).unwrap_err();
        assert_eq!(
            error.to_string(),
            "url: address 169.254.169.254 refused (link-local); only public addresses are \
             allowed (see --webhook-allow-private)"
        );
        assert_eq!(
            check_url("ftp://example.com/", false)
                .unwrap_err()
                .to_string(),
            "url: the scheme must be http or https, not \"ftp\""
        );
    }

    #[test]
    fn the_resolver_keeps_only_public_addresses() {
        let addresses = |list: &[&str]| -> Vec<SocketAddr> {
            list.iter()
                .map(|ip| SocketAddr::new(ip.parse().unwrap(), 0))
                .collect()
        };
        let host = || "hooks.example.com".to_owned();
        let mixed = addresses(&["127.0.0.1", "93.184.215.14", "::1", "2606:4700::1"]);
        assert_eq!(
            usable(host(), mixed.clone(), false).unwrap(),
            addresses(&["93.184.215.14", "2606:4700::1"])
        );
        assert_eq!(usable(host(), mixed.clone(), true).unwrap(), mixed);
        let internal = addresses(&["169.254.169.254", "10.0.0.7"]);
        assert_eq!(
            usable(host(), internal.clone(), false)
                .unwrap_err()
                .to_string(),
            "hooks.example.com: address 169.254.169.254 refused (link-local)"
        );
        assert_eq!(usable(host(), internal.clone(), true).unwrap(), internal);
        assert_eq!(
            usable(host(), Vec::new(), true).unwrap_err().to_string(),
            "hooks.example.com resolves to no address"
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_dates_and_caps_them() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(RETRY_AFTER, value.parse().unwrap());
            retry_after(&headers, now)
        };
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(at("120"), Some(Duration::from_secs(120)));
        assert_eq!(at(" 0 "), Some(Duration::ZERO));
        assert_eq!(at("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(at("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(at(&in_90s), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(at(&past), Some(Duration::ZERO));
        let far = httpdate::fmt_http_date(now + Duration::from_secs(7 * 86400));
        assert_eq!(at(&far), Some(MAX_RETRY_AFTER));
        assert_eq!(at("soon"), None);
        assert_eq!(at("-5"), None);
        assert_eq!(at("1.5"), None);
    }

    #[test]
    fn refusal_reasons_are_one_short_line() {
        let html = "<html>\r\n  <body>\n\tService\u{0}Unavailable</body>\n</html>\n";
        assert_eq!(
            refusal_reason(StatusCode::SERVICE_UNAVAILABLE, None, html.as_bytes()),
            "HTTP 503: <html> <body> Service Unavailable</body> </html>"
        );
        assert_eq!(
            refusal_reason(StatusCode::BAD_REQUEST, None, b""),
            "HTTP 400"
        );
        let long = "é".repeat(300);
        let reason = refusal_reason(StatusCode::INTERNAL_SERVER_ERROR, None, long.as_bytes());
        assert_eq!(reason, format!("HTTP 500: {}", "é".repeat(200)));
        // A body cut inside a character is still text.
        let cut = &"é".as_bytes()[..1];
        assert_eq!(
            refusal_reason(StatusCode::BAD_GATEWAY, None, cut),
            "HTTP 502: \u{FFFD}"
        );
        assert_eq!(
            refusal_reason(
                StatusCode::FOUND,
                Some("https://elsewhere.example/"),
                b"moved"
            ),
            "HTTP 302: redirect to https://elsewhere.example/ not followed"
        );
    }
}
