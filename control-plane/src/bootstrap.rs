//! Bootstrap tokens: how a new VM proves which instance it is when it asks
//! the gateway for its cloud-init documents.
//!
//! A token is 128 random bits (base64url, no padding), handed to the VM inside
//! its NoCloud seed URL `<gateway_url>/cloud-init/<token>/`. The store keeps
//! only its SHA-256, bound to one instance, with a TTL; it is revoked when the
//! instance's runner takes a job and when the instance is deleted. A token is
//! never logged: log lines name the instance instead.

use std::time::Duration;

use base64::Engine;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreResult};

/// A fresh token (128 random bits).
pub fn new_token() -> SecretString {
    let bytes: [u8; 16] = rand::random();
    SecretString::from(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// What the store keeps of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Issues a token for `instance` and returns its NoCloud seed URL (a secret:
/// it embeds the token).
pub async fn issue(
    store: &dyn Store,
    gateway_url: &str,
    instance: &str,
    ttl: Duration,
) -> StoreResult<SecretString> {
    issue_with_secret(store, gateway_url, instance, ttl, None).await
}

/// [`issue`], with `secret` (the runner's JIT config) stored sealed under
/// the new token for as long as the token lives; [`sealed_secret`] gives it
/// back to whoever presents the token.
pub async fn issue_with_secret(
    store: &dyn Store,
    gateway_url: &str,
    instance: &str,
    ttl: Duration,
    secret: Option<&SecretString>,
) -> StoreResult<SecretString> {
    let token = new_token();
    let hash = hash_token(token.expose_secret());
    if let Some(secret) = secret {
        // First the secret, then the token: a valid token always finds it.
        let sealed = seal(token.expose_secret(), instance, secret.expose_secret());
        store.put_bootstrap_secret(&hash, &sealed, ttl).await?;
    }
    store.put_bootstrap_token(&hash, instance, ttl).await?;
    Ok(SecretString::from(format!(
        "{}/cloud-init/{}/",
        gateway_url.trim_end_matches('/'),
        token.expose_secret()
    )))
}

/// The secret stored sealed under `token` for `instance`, if any (and if it
/// opens: a tampered or foreign record does not).
pub async fn sealed_secret(
    store: &dyn Store,
    token: &str,
    instance: &str,
) -> StoreResult<Option<SecretString>> {
    Ok(store
        .bootstrap_secret(&hash_token(token))
        .await?
        .and_then(|sealed| open(token, instance, &sealed)))
}

/// The sealing key of a token: SHA-256 of a label and the token (128
/// random bits, so no stretching is needed); not the stored hash.
fn key(token: &str) -> LessSafeKey {
    let mut h = Sha256::new();
    h.update(b"grs-bootstrap-secret-v1\0");
    h.update(token.as_bytes());
    let key = UnboundKey::new(&CHACHA20_POLY1305, &h.finalize())
        .expect("a 32-byte key is what ChaCha20-Poly1305 takes");
    LessSafeKey::new(key)
}

/// `secret` sealed for whoever holds `token`, bound to `instance`:
/// base64url of a random nonce, the ciphertext and its tag.
pub fn seal(token: &str, instance: &str, secret: &str) -> String {
    let nonce: [u8; NONCE_LEN] = rand::random();
    let mut data = secret.as_bytes().to_vec();
    key(token)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(instance.as_bytes()),
            &mut data,
        )
        .expect("sealing in memory cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
}

/// What [`seal`] sealed, if `token` and `instance` are the ones it was
/// sealed for and nothing was changed.
pub fn open(token: &str, instance: &str, sealed: &str) -> Option<SecretString> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sealed)
        .ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, data) = raw.split_at(NONCE_LEN);
    let mut data = data.to_vec();
    let plain = key(token)
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).ok()?,
            Aad::from(instance.as_bytes()),
            &mut data,
        )
        .ok()?;
    String::from_utf8(plain.to_vec())
        .ok()
        .map(SecretString::from)
}

/// The instance a presented token is bound to, if it is valid. Tokens of an
/// implausible shape are refused without a store lookup.
pub async fn redeem(store: &dyn Store, token: &str) -> StoreResult<Option<String>> {
    if token.len() != 22
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Ok(None);
    }
    store.lookup_bootstrap_token(&hash_token(token)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn an_issued_token_redeems_to_its_instance_and_only_its_hash_is_stored() {
        let store = MemoryStore::new();
        let url = issue(&store, "http://gw:8080/", "grs-1", Duration::from_secs(60))
            .await
            .unwrap();
        let url = url.expose_secret();
        assert!(
            url.starts_with("http://gw:8080/cloud-init/") && url.ends_with('/'),
            "{url}"
        );
        let token = token_in(url);
        let token = token.as_str();
        assert_eq!(token.len(), 22, "128 bits in base64url");
        assert_eq!(
            redeem(&store, token).await.unwrap().as_deref(),
            Some("grs-1")
        );
        assert_eq!(
            store.lookup_bootstrap_token(token).await.unwrap(),
            None,
            "the raw token is not a key"
        );
        assert_eq!(
            redeem(&store, "AAAAAAAAAAAAAAAAAAAAAA").await.unwrap(),
            None
        );
        assert_eq!(redeem(&store, "../../etc/passwd").await.unwrap(), None);
    }

    /// The token of a seed URL (`<gateway>/cloud-init/<token>/`).
    fn token_in(url: &str) -> String {
        url.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn a_secret_issued_with_a_token_comes_back_only_with_that_token_and_instance() {
        let store = MemoryStore::new();
        let jit = SecretString::from("eyJqaXQiOiJjb25maWcifQ==".to_owned());
        let url = issue_with_secret(
            &store,
            "http://gw",
            "grs-1",
            Duration::from_secs(60),
            Some(&jit),
        )
        .await
        .unwrap();
        let token = token_in(url.expose_secret());
        let got = sealed_secret(&store, &token, "grs-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.expose_secret(), jit.expose_secret());
        // Again: the same document within the token's lifetime.
        let again = sealed_secret(&store, &token, "grs-1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.expose_secret(), jit.expose_secret());
        // What the store holds is neither the secret nor openable without
        // the token, nor for another instance.
        let stored = store
            .bootstrap_secret(&hash_token(&token))
            .await
            .unwrap()
            .unwrap();
        assert!(!stored.contains(jit.expose_secret()));
        assert!(open("AAAAAAAAAAAAAAAAAAAAAA", "grs-1", &stored).is_none());
        assert!(open(&token, "grs-2", &stored).is_none());
        assert!(
            sealed_secret(&store, &token, "grs-2")
                .await
                .unwrap()
                .is_none()
        );
        // Tampered: refused.
        let mut bad = stored.into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(open(&token, "grs-1", &String::from_utf8(bad).unwrap()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sealed_secret_lives_as_long_as_its_token() {
        let store = MemoryStore::new();
        let jit = SecretString::from("cfg".to_owned());
        let url = issue_with_secret(
            &store,
            "http://gw",
            "grs-1",
            Duration::from_secs(60),
            Some(&jit),
        )
        .await
        .unwrap();
        let token = token_in(url.expose_secret());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(
            sealed_secret(&store, &token, "grs-1")
                .await
                .unwrap()
                .is_none()
        );
        assert!(redeem(&store, &token).await.unwrap().is_none());
    }

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token().expose_secret(), new_token().expose_secret());
    }
}
