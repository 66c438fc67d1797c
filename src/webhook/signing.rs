//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): a shared secret per
//! webhook, shown to its owner as `whsec_<base64>`, and a `v1,<base64>` HMAC-SHA256 over
//! `{msg_id}.{timestamp}.{body}` sent in the `webhook-signature` header.
//!
//! The format is the standard's so that receivers can verify with any of its libraries rather
//! than with code written for this service.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// How a secret is marked when shown to people, so it is recognized as a symmetric key.
const PREFIX: &str = "whsec_";
/// The bytes of a generated secret: the standard's minimum (192 bits).
const GENERATED_BYTES: usize = 24;
/// The standard asks for symmetric secrets of 24 to 64 bytes (192 to 512 bits); a shorter key
/// would be weak, a longer one is hashed down by HMAC anyway.
const MIN_BYTES: usize = 24;
const MAX_BYTES: usize = 64;
/// Identifies the HMAC-SHA256 scheme in `webhook-signature`.
const VERSION: &str = "v1";

/// A webhook's signing key: raw bytes, shown as `whsec_<standard base64>`.
///
/// `Debug` does not show the key, so it cannot leak through a logged struct.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

/// Why a string is not a usable secret. The message is one line, fit for a 400 response; it never
/// repeats the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSecret {
    #[error("secret: must start with \"whsec_\"")]
    Prefix,
    #[error("secret: the part after \"whsec_\" is not standard base64")]
    Base64,
    #[error("secret: is {0} bytes long; Standard Webhooks asks for 24 to 64")]
    Length(usize),
}

impl Secret {
    /// A new random secret from the operating system's generator.
    ///
    /// # Panics
    /// If the operating system has no random source to offer, which leaves nothing safe to sign
    /// with.
    pub fn generate() -> Secret {
        let mut key = vec![0; GENERATED_BYTES];
        getrandom::fill(&mut key).expect("the operating system's random source failed");
        Secret { key }
    }

    /// Reads `whsec_<standard base64>`, as [`Display`](fmt::Display) writes it.
    pub fn parse(text: &str) -> Result<Secret, InvalidSecret> {
        let encoded = text.strip_prefix(PREFIX).ok_or(InvalidSecret::Prefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| InvalidSecret::Base64)?;
        if !(MIN_BYTES..=MAX_BYTES).contains(&key.len()) {
            return Err(InvalidSecret::Length(key.len()));
        }
        Ok(Secret { key })
    }

    /// The `webhook-signature` value for one delivery: `v1,` and the base64 HMAC-SHA256 of
    /// `{msg_id}.{timestamp}.{body}`. The body is signed as sent, byte for byte; `timestamp` is in
    /// Unix seconds, the same number sent in `webhook-timestamp`.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC takes a key of any length, so this cannot fail.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(itoa::Buffer::new().format(timestamp).as_bytes());
        mac.update(b".");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        format!("{VERSION},{}", STANDARD.encode(tag))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", STANDARD.encode(&self.key))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use reqwest::header::{HeaderMap, HeaderValue};
    use standardwebhooks::Webhook;

    #[test]
    fn a_generated_secret_survives_display_and_parse() {
        let secret = Secret::generate();
        assert_eq!(secret.key.len(), 24);
        let shown = secret.to_string();
        assert!(shown.starts_with("whsec_"), "{shown}");
        assert_eq!(Secret::parse(&shown), Ok(secret));
        // Two secrets are not the same one.
        assert_ne!(Secret::generate(), Secret::generate());
    }

    #[test]
    fn a_secret_is_parsed_to_its_bytes_and_shown_the_same() {
        let text = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
        let secret = Secret::parse(text).unwrap();
        assert_eq!(secret.key.len(), 24);
        assert_eq!(secret.to_string(), text);
    }

    #[test]
    fn malformed_secrets_are_refused_with_a_reason() {
        let key = STANDARD.encode([7u8; 24]);
        assert_eq!(Secret::parse(&key), Err(InvalidSecret::Prefix));
        assert_eq!(
            Secret::parse("whsec_not base64!"),
            Err(InvalidSecret::Base64)
        );
        // URL-safe base64 is not the standard alphabet.
        assert_eq!(
            Secret::parse("whsec_C2FVsBQIhrscChlQIMV-b5sSYspob7oD"),
            Err(InvalidSecret::Base64)
        );
        let short = format!("whsec_{}", STANDARD.encode([7u8; 23]));
        assert_eq!(Secret::parse(&short), Err(InvalidSecret::Length(23)));
        let long = format!("whsec_{}", STANDARD.encode([7u8; 65]));
        assert_eq!(Secret::parse(&long), Err(InvalidSecret::Length(65)));
        assert!(Secret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 64]))).is_ok());
        assert!(
            !InvalidSecret::Base64.to_string().contains('\n'),
            "one line for a 400"
        );
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let secret = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let debug = format!("{secret:?}");
        assert!(!debug.contains("C2FV"), "{debug}");
        assert_eq!(debug, "Secret(redacted)");
    }

    /// The vector of the reference libraries' own tests (standard-webhooks, libraries/rust): a
    /// fixed secret, id, timestamp and body and the signature they must give.
    #[test]
    fn signs_the_reference_vector() {
        let secret = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        assert_eq!(
            secret.sign("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553, body),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    fn headers(msg_id: &str, timestamp: i64, signature: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("webhook-id", HeaderValue::from_str(msg_id).unwrap());
        headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
        headers.insert(
            "webhook-signature",
            HeaderValue::from_str(signature).unwrap(),
        );
        headers
    }

    /// The reference implementation accepts what we send and refuses it once anything signed has
    /// changed. It checks the timestamp against its clock, so the test signs with the current
    /// time.
    #[test]
    fn the_reference_implementation_verifies_our_signatures() {
        let secret = Secret::generate();
        let webhook = Webhook::new(&secret.to_string()).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let msg_id = "msg_consumer-a_1041";
        let body = br#"{"events":[{"id":1041,"type":"order.paid","data":{"total":12}}]}"#;
        let signature = secret.sign(msg_id, now, body);
        webhook
            .verify(body, &headers(msg_id, now, &signature))
            .expect("the reference implementation accepts our signature");

        let tampered = br#"{"events":[{"id":1041,"type":"order.paid","data":{"total":13}}]}"#;
        assert!(
            webhook
                .verify(tampered, &headers(msg_id, now, &signature))
                .is_err()
        );
        assert!(
            webhook
                .verify(body, &headers("msg_consumer-a_1042", now, &signature))
                .is_err()
        );
        assert!(
            webhook
                .verify(body, &headers(msg_id, now - 1, &signature))
                .is_err()
        );
        let other = Webhook::new(&Secret::generate().to_string()).unwrap();
        assert!(
            other
                .verify(body, &headers(msg_id, now, &signature))
                .is_err()
        );
    }
}
