//! A persona's TLS identity: the certificate chain lives in the persona, the private key
//! stays in a file on the host and only its path is stored.
use std::{net::IpAddr, path::PathBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::{Deserialize, Serialize};
use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

use super::FieldError;
use crate::keys::KeyDir;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsSpec {
    /// PEM certificate chain, leaf first.
    pub certificate: String,
    /// PEM private key file on the host running the daemon.
    pub key_file: PathBuf,
    /// DNS names the certificate must cover; without any, it must cover the persona's
    /// addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

fn err(field: &str, reason: impl Into<String>) -> FieldError {
    FieldError::new(format!("spec.tls.{field}"), reason)
}

fn chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, FieldError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| err("certificate", format!("is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("certificate", "holds no certificate"));
    }
    Ok(certs)
}

fn dns_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.to_ascii_lowercase(), name.to_ascii_lowercase());
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// Checks what needs no secret: the chain parses, the leaf is valid now, and it covers
/// the names (or, without names, the addresses).
pub fn check_certificate(
    tls: &TlsSpec,
    addresses: &[IpAddr],
    now: jiff::Timestamp,
) -> Result<(), FieldError> {
    let certs = chain(&tls.certificate)?;
    let parsed = certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            x509_parser::certificate::X509Certificate::from_der(der)
                .map(|(_, c)| c)
                .map_err(|e| {
                    err(
                        "certificate",
                        format!("certificate {} does not parse: {e}", i + 1),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Each certificate is signed by the next one's key. The last one's issuer is a trust
    // anchor, the client's to hold: a root sent along is not checked against itself.
    for (i, pair) in parsed.windows(2).enumerate() {
        let (cert, issuer) = (&pair[0], pair[1].public_key());
        if cert.issuer() != pair[1].subject() {
            return Err(err(
                "certificate",
                format!("certificate {} was not issued by the next one", i + 1),
            ));
        }
        cert.verify_signature(Some(issuer)).map_err(|_| {
            err(
                "certificate",
                format!(
                    "certificate {}'s signature does not verify with its issuer's key",
                    i + 1
                ),
            )
        })?;
    }
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&certs[0])
        .map_err(|e| err("certificate", format!("does not parse: {e}")))?;
    let validity = leaf.validity();
    let now = now.as_second();
    if now > validity.not_after.timestamp() {
        return Err(err(
            "certificate",
            format!("expired on {}", validity.not_after),
        ));
    }
    if now < validity.not_before.timestamp() {
        return Err(err(
            "certificate",
            format!("is not valid before {}", validity.not_before),
        ));
    }
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).expect("4 bytes"))),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).expect("16 bytes"))),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if tls.names.is_empty() {
        for a in addresses {
            if !ips.contains(a) {
                return Err(err(
                    "certificate",
                    format!("does not cover the persona's address {a}"),
                ));
            }
        }
    }
    for (i, n) in tls.names.iter().enumerate() {
        if !dns.iter().any(|p| dns_matches(p, n)) {
            return Err(err(
                &format!("names[{i}]"),
                format!("{n:?} is not covered by the certificate"),
            ));
        }
    }
    Ok(())
}

/// Checks that the key file exists, parses and belongs to the certificate. Runs where
/// the key is: on the daemon's host.
pub fn check_key(tls: &TlsSpec, keys: &KeyDir) -> Result<Vec<u8>, FieldError> {
    let bytes = keys
        .read(&tls.key_file)
        .map_err(|reason| err("keyFile", reason))?;
    let key = PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|_| err("keyFile", "holds no PEM private key"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| err("keyFile", format!("unsupported key: {e}")))?;
    let spki = signer
        .public_key()
        .ok_or_else(|| err("keyFile", "cannot derive the public key"))?;
    let certs = chain(&tls.certificate)?;
    let (_, leaf) = x509_parser::certificate::X509Certificate::from_der(&certs[0])
        .map_err(|e| err("certificate", format!("does not parse: {e}")))?;
    if leaf.public_key().raw != spki.as_ref() {
        return Err(err(
            "keyFile",
            "does not match the certificate's public key",
        ));
    }
    Ok(bytes)
}
