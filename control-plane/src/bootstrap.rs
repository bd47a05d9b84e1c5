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
    let token = new_token();
    store
        .put_bootstrap_token(&hash_token(token.expose_secret()), instance, ttl)
        .await?;
    Ok(SecretString::from(format!(
        "{}/cloud-init/{}/",
        gateway_url.trim_end_matches('/'),
        token.expose_secret()
    )))
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
        let token = url.trim_end_matches('/').rsplit('/').next().unwrap();
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

    #[test]
    fn tokens_differ() {
        assert_ne!(new_token().expose_secret(), new_token().expose_secret());
    }
}
