//! TLS for the PVE client: system roots, a CA file, a pinned certificate
//! fingerprint, or (explicitly, loudly) nothing.
//!
//! PVE ships a self-signed certificate per node; most operators either copy
//! the cluster CA (`/etc/pve/pve-root-ca.pem`) or pin the node certificate's
//! SHA-256 fingerprint, as Proxmox's own clients do. A pin is checked against
//! the end-entity certificate only, and the handshake signature is still
//! verified, so a pin proves possession of that certificate's key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, ProxmoxConfig};

/// Why a certificate fingerprint or a PEM file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Not hex digits (with or without `:`).
    #[error("{fingerprint:?} is not a SHA-256 fingerprint (AA:BB:... hex)")]
    FingerprintNotHex {
        /// The fingerprint as given.
        fingerprint: String,
        /// The decoder's complaint.
        #[source]
        source: hex::FromHexError,
    },
    /// Hex, but not 32 bytes long.
    #[error("{fingerprint:?} is not a SHA-256 fingerprint (32 bytes)")]
    FingerprintLength {
        /// The fingerprint as given.
        fingerprint: String,
    },
    /// Not a PEM certificate file.
    #[error("not a PEM certificate file: {0}")]
    Pem(#[source] rustls_pki_types::pem::Error),
    /// A PEM file without a certificate.
    #[error("no certificate found")]
    NoCertificate,
}

/// Parses `AA:BB:...` (or plain hex) into the 32 bytes of a SHA-256 digest.
pub fn parse_fingerprint(fp: &str) -> Result<[u8; 32], CertError> {
    let hexed: String = fp.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hexed).map_err(|source| CertError::FingerprintNotHex {
        fingerprint: fp.to_owned(),
        source,
    })?;
    bytes.try_into().map_err(|_| CertError::FingerprintLength {
        fingerprint: fp.to_owned(),
    })
}

/// The SHA-256 fingerprint of a DER certificate, as `AA:BB:...`.
pub fn fingerprint_of(der: &[u8]) -> String {
    format_fingerprint(&Sha256::digest(der).into())
}

fn format_fingerprint(fp: &[u8; 32]) -> String {
    fp.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration `conn` asks for.
pub fn client_config(conn: &ProxmoxConfig) -> Result<ClientConfig, ConfigError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError {
            key: "proxmox".into(),
            message: format!("TLS setup failed: {e}"),
        })?;
    let algs = provider().signature_verification_algorithms;
    if let Some(fp) = &conn.fingerprint {
        let pin = parse_fingerprint(fp).map_err(|e| ConfigError {
            key: "proxmox.fingerprint".into(),
            message: e.to_string(),
        })?;
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedVerifier {
                accept: Accept::Pinned(pin),
                algs,
            }))
            .with_no_client_auth());
    }
    if conn.insecure_skip_verify {
        tracing::warn!(
            url = %conn.url,
            "proxmox.insecure_skip_verify is set: the PVE certificate is NOT verified; \
             anyone on the path can read the API token. Use a fingerprint or ca_file instead."
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(FixedVerifier {
                accept: Accept::Any,
                algs,
            }))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = &conn.ca_file {
        let key = "proxmox.ca_file";
        let pem = std::fs::read(path).map_err(|e| ConfigError {
            key: key.into(),
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        let certs = parse_pem_certs(&pem).map_err(|m| ConfigError {
            key: key.into(),
            message: format!("{}: {m}", path.display()),
        })?;
        for c in certs {
            roots.add(c).map_err(|e| ConfigError {
                key: key.into(),
                message: format!("{}: unusable certificate: {e}", path.display()),
            })?;
        }
    } else {
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            // A single broken system certificate must not stop the others.
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            tracing::warn!(
                "no system root certificates found; set proxmox.ca_file or proxmox.fingerprint"
            );
        }
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Certificates of a PEM file.
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(CertError::Pem)?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

/// Which certificates [`FixedVerifier`] accepts.
#[derive(Debug)]
enum Accept {
    /// Exactly the certificate whose SHA-256 digest is this.
    Pinned([u8; 32]),
    /// Any certificate (insecure mode).
    Any,
}

/// Certificate checks that do not use a chain of trust (pinning, insecure);
/// handshake signatures are still verified.
#[derive(Debug)]
struct FixedVerifier {
    accept: Accept,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for FixedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Accept::Pinned(pin) = &self.accept else {
            return Ok(ServerCertVerified::assertion());
        };
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == *pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate fingerprint mismatch: expected {}, server presented {}",
                format_fingerprint(pin),
                format_fingerprint(&got)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_with_or_without_colons_and_round_trip() {
        let der = b"not really a certificate";
        let fp = fingerprint_of(der);
        assert_eq!(fp.len(), 32 * 3 - 1);
        let a = parse_fingerprint(&fp).unwrap();
        let b = parse_fingerprint(&fp.replace(':', "").to_lowercase()).unwrap();
        assert_eq!(a, b);
        assert!(matches!(
            parse_fingerprint("AA:BB").unwrap_err(),
            CertError::FingerprintLength { fingerprint } if fingerprint == "AA:BB"
        ));
        let e = parse_fingerprint("not hex").unwrap_err();
        assert!(matches!(e, CertError::FingerprintNotHex { .. }), "{e}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the decoder's error is kept"
        );
    }
}
