//! `X-Hub-Signature-256`: HMAC-SHA256 of the raw request body, keyed with the
//! webhook secret, sent as `sha256=<64 lowercase hex digits>`.
//!
//! Guarantees: the comparison runs in constant time with respect to the
//! expected MAC (no early exit on the first differing byte), and nothing
//! about the secret or the expected MAC reaches an error message.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The header GitHub signs deliveries with.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";

/// Why a delivery's signature was refused. The messages are safe to log and
/// say nothing about what the right signature would have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `X-Hub-Signature-256` header at all.
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    /// The header is not `sha256=` followed by 64 hex digits.
    #[error("malformed X-Hub-Signature-256 header")]
    Malformed,
    /// Well-formed, but not the HMAC of this body under our secret.
    #[error("X-Hub-Signature-256 does not match the body")]
    Mismatch,
}

/// The `X-Hub-Signature-256` value for `body` under `secret`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks `header` (the raw `X-Hub-Signature-256` value, if any) against
/// `body` under `secret`.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&[u8]>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_part = header
        .strip_prefix(b"sha256=")
        .ok_or(SignatureError::Malformed)?;
    let mut given = [0u8; 32];
    // Upper-case hex is accepted too: GitHub sends lower case, but the value
    // is a number, not a string.
    hex::decode_to_slice(hex_part, &mut given).map_err(|_| SignatureError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    if bool::from(expected.as_slice().ct_eq(&given)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GitHub's published test vector, read from the shared fixture.
    #[test]
    fn githubs_published_test_vector_verifies() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/github/webhook-signature-test-vector.json"
        );
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let secret = v["secret"].as_str().unwrap().as_bytes();
        let body = v["payload"].as_str().unwrap().as_bytes();
        let header = v["x_hub_signature_256"].as_str().unwrap();
        assert_eq!(sign(secret, body), header);
        assert_eq!(verify(secret, body, Some(header.as_bytes())), Ok(()));
        // And the literal value, so a broken fixture path cannot hide a bug.
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn a_changed_body_secret_or_digit_is_a_mismatch() {
        let good = sign(b"s", b"body");
        assert_eq!(
            verify(b"s", b"body!", Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"t", b"body", Some(good.as_bytes())),
            Err(SignatureError::Mismatch)
        );
        let mut flipped = good.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            verify(b"s", b"body", Some(&flipped)),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_and_malformed_headers_are_told_apart() {
        assert_eq!(verify(b"s", b"b", None), Err(SignatureError::Missing));
        for bad in [
            &b""[..],
            b"sha1=abcd",
            b"sha256=",
            b"sha256=zz",
            b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e",
            b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e1700",
        ] {
            assert_eq!(
                verify(b"s", b"b", Some(bad)),
                Err(SignatureError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn upper_case_hex_is_the_same_signature() {
        let good = sign(b"s", b"body");
        let upper = format!("sha256={}", good[7..].to_ascii_uppercase());
        assert_eq!(verify(b"s", b"body", Some(upper.as_bytes())), Ok(()));
    }
}
