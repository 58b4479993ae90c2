//! The consortium PKI: the CA, certificate requests and signing, and identity read back from a
//! verified certificate.
//!
//! Identity and role live in the certificate, in a URI subject alternative name
//! `urn:sanctum:<role>:<name>` chosen by the lead when signing (what a CSR asks for is ignored).
//! A hospital creates its own private key and only ever sends a CSR.

use std::fmt;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::hash::ContentHash;

/// What a certificate holder may do. It comes from the certificate, never from a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The coordinator's server certificate.
    Coordinator,
    /// A hospital's node daemon.
    Node,
    /// The consortium lead: submits and watches plans.
    Lead,
    /// A compliance auditor: read-only.
    Auditor,
}

impl Role {
    /// The spelling used in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Node => "node",
            Role::Lead => "lead",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "coordinator" => Ok(Role::Coordinator),
            "node" => Ok(Role::Node),
            "lead" => Ok(Role::Lead),
            "auditor" => Ok(Role::Auditor),
            other => Err(PkiError::UnknownRole(other.to_string())),
        }
    }
}

/// Who is on the other end of a verified connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The member's name, unique in the consortium (`cleveland`).
    pub name: String,
    /// What the member may do.
    pub role: Role,
    /// SHA-256 of the certificate's DER, for logs and audit records.
    pub fingerprint: ContentHash,
    /// When the certificate stops being valid: TLS checks it at the handshake, the role guard on
    /// every call of a connection that outlives it.
    pub not_after: OffsetDateTime,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// Everything that can go wrong with keys, requests and certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unknown role '{0}': use one of node, lead, auditor, coordinator")]
    UnknownRole(String),
    #[error(
        "invalid member name '{0}': use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("certificate request is not valid: {0}")]
    BadRequest(String),
    #[error("certificate is not valid: {0}")]
    BadCertificate(String),
    #[error(
        "certificate has no Sanctum identity (URI SAN urn:sanctum:<role>:<name>): was it signed with `sanctum-coordinator pki sign`?"
    )]
    NoIdentity,
    #[error("key or certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("revocation list is not valid: {0}")]
    BadRevocationList(String),
}

const URI_PREFIX: &str = "urn:sanctum:";

/// Checks a member name: it becomes part of certificates, file names and log lines.
/// The rule is [`crate::ids::NodeName`]'s, so a name read from a certificate is a `NodeName`.
pub fn validate_name(name: &str) -> Result<(), PkiError> {
    crate::ids::NodeName::parse(name).map(drop).map_err(|_| PkiError::InvalidName(name.to_string()))
}

/// A PEM certificate and its PEM private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Creates the consortium CA (self-signed, ECDSA P-256).
pub fn init_ca(consortium: &str, days: i64) -> Result<Issued, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{consortium} consortium CA"));
    dn.push(DnType::OrganizationName, consortium);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, days);
    let cert = params.self_signed(&key)?;
    Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Creates a private key and a CSR for `name`. The key stays with whoever calls this.
pub fn request(name: &str) -> Result<(String, String), PkiError> {
    validate_name(name)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// What the lead decides when signing: the request says nothing about identity or role.
pub struct SignSpec<'a> {
    pub name: &'a str,
    pub role: Role,
    pub days: i64,
    /// DNS names or IP addresses a server certificate answers for (coordinator only).
    pub hosts: &'a [String],
}

/// Signs a CSR with the CA, with the identity and role the lead chose.
pub fn sign(ca_cert_pem: &str, ca_key_pem: &str, csr_pem: &str, spec: &SignSpec<'_>) -> Result<String, PkiError> {
    validate_name(spec.name)?;
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| PkiError::BadCertificate(format!("CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)
        .map_err(|e| PkiError::BadCertificate(format!("CA certificate: {e}")))?;
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        PkiError::BadRequest(format!("{e}; expected a PEM 'CERTIFICATE REQUEST' from `sanctum-node pki request`"))
    })?;
    let params = leaf_params(spec)?;
    let cert = params.signed_by(&csr.public_key, &issuer)?;
    Ok(cert.pem())
}

/// Issues a certificate with a fresh key (for the lead's own and the coordinator's, made where
/// the CA lives, and for simulations).
pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, spec: &SignSpec<'_>) -> Result<Issued, PkiError> {
    let (key_pem, csr_pem) = request(spec.name)?;
    let cert_pem = sign(ca_cert_pem, ca_key_pem, &csr_pem, spec)?;
    Ok(Issued { cert_pem, key_pem })
}

fn leaf_params(spec: &SignSpec<'_>) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, spec.name);
    params.distinguished_name = dn;
    let uri = format!("{URI_PREFIX}{}:{}", spec.role, spec.name);
    params.subject_alt_names.push(SanType::URI(uri.try_into().map_err(|e| PkiError::BadRequest(format!("{e}")))?));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    if spec.role == Role::Coordinator {
        params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        for host in spec.hosts {
            let san = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    host.clone().try_into().map_err(|e| PkiError::BadRequest(format!("host '{host}': {e}")))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
    }
    set_validity(&mut params, spec.days);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // A minute of slack for clocks that disagree a little.
    params.not_before = now - Duration::minutes(1);
    params.not_after = now + Duration::days(days);
}

/// Writes a private key readable only by its owner; never overwrites an existing file, so a
/// second request cannot destroy a key that certificates were issued for.
pub fn write_private_key(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(pem.as_bytes())?;
    f.sync_all()
}

/// When a certificate (DER) stops being valid.
pub fn not_after(der: &[u8]) -> Result<time::OffsetDateTime, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(cert.validity().not_after.to_datetime())
}

/// The public key (DER SubjectPublicKeyInfo) a CSR asks a certificate for.
pub fn request_public_key(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls_pki_types::{CertificateSigningRequestDer, pem::PemObject};
    use x509_parser::prelude::*;
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        PkiError::BadRequest(format!("{e}; expected a PEM 'CERTIFICATE REQUEST' from `sanctum-node pki request`"))
    })?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| PkiError::BadRequest(format!("cannot parse: {e}")))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// The public key (DER SubjectPublicKeyInfo) a certificate (DER) is issued for.
pub fn certificate_public_key(der: &[u8]) -> Result<Vec<u8>, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(format!("cannot parse: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

/// Parses the consortium's revocation list (`pki/revoked.json`, written by `pki revoke`): a JSON
/// array of entries, each naming a member and the certificate it revokes by fingerprint (the
/// SHA-256 of the certificate's DER, 64 hex digits).
///
/// Anything else is an error, never an empty list: a list that does not say what it revokes
/// must not be read as revoking nothing. Fingerprints come back in lowercase, the spelling
/// connections are matched in, so a hand-edited uppercase entry still revokes.
pub fn parse_revocation_list(text: &str) -> Result<Vec<crate::tls::RevokedCert>, PkiError> {
    let entries: Vec<crate::tls::RevokedCert> = serde_json::from_str(text).map_err(|e| {
        PkiError::BadRevocationList(format!(
            "{e}; expected a JSON array of {{\"name\", \"fingerprint\", \"revoked_at\", \"reason\"}} entries"
        ))
    })?;
    entries
        .into_iter()
        .enumerate()
        .map(|(i, mut entry)| {
            let n = i + 1;
            if entry.fingerprint.len() != 64 || !entry.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
                // Shown as text, never sliced by bytes: the file may hold anything.
                let shown: String = entry.fingerprint.chars().take(70).collect();
                return Err(PkiError::BadRevocationList(format!(
                    "entry {n} ('{}'): fingerprint {shown:?} is not 64 hex digits (the SHA-256 of the certificate, as `pki list --json` shows it)",
                    entry.name.chars().take(70).collect::<String>()
                )));
            }
            validate_name(&entry.name).map_err(|e| PkiError::BadRevocationList(format!("entry {n}: {e}")))?;
            entry.fingerprint.make_ascii_lowercase();
            Ok(entry)
        })
        .collect()
}

/// Reads the Sanctum identity out of a certificate (already verified by TLS).
pub fn identity_from_der(der: &[u8]) -> Result<Identity, PkiError> {
    use x509_parser::prelude::*;
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::BadCertificate(format!("cannot parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(format!("subject alternative names: {e}")))?
        .ok_or(PkiError::NoIdentity)?;
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name
            && let Some(rest) = uri.strip_prefix(URI_PREFIX)
        {
            let (role, member) = rest.split_once(':').ok_or(PkiError::NoIdentity)?;
            validate_name(member)?;
            return Ok(Identity {
                name: member.to_string(),
                role: role.parse()?,
                fingerprint: ContentHash::of(der),
                not_after: cert.validity().not_after.to_datetime(),
            });
        }
    }
    Err(PkiError::NoIdentity)
}

/// Reads the identity from the first certificate of a PEM file's contents.
pub fn identity_from_pem(pem: &str) -> Result<Identity, PkiError> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::BadCertificate(format!("not a PEM certificate: {e}")))?;
    identity_from_der(&der)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_certificate_carries_the_leads_choice_of_identity() -> Result<(), PkiError> {
        let ca = init_ca("test", 30)?;
        let (_key, csr) = request("cleveland")?;
        let cert = sign(
            &ca.cert_pem,
            &ca.key_pem,
            &csr,
            &SignSpec { name: "cleveland", role: Role::Node, days: 90, hosts: &[] },
        )?;
        let id = identity_from_pem(&cert)?;
        assert_eq!(id.name, "cleveland");
        assert_eq!(id.role, Role::Node);
        Ok(())
    }

    #[test]
    fn bad_names_and_garbage_requests_are_refused() -> Result<(), PkiError> {
        for bad in ["", "Cleveland", "a b", "-x", &"a".repeat(64), "x/y"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        let ca = init_ca("test", 30)?;
        let spec = SignSpec { name: "x", role: Role::Node, days: 1, hosts: &[] };
        let err = sign(&ca.cert_pem, &ca.key_pem, "not a csr", &spec);
        assert!(matches!(err, Err(PkiError::BadRequest(_))));
        // A CA certificate is not a member certificate.
        assert!(matches!(identity_from_pem(&ca.cert_pem), Err(PkiError::NoIdentity)));
        Ok(())
    }

    #[test]
    fn a_certificate_carries_the_key_of_its_request_and_no_other() -> Result<(), PkiError> {
        let ca = init_ca("test", 30)?;
        let (_key, csr) = request("cleveland")?;
        let (_other_key, other_csr) = request("cleveland")?;
        let spec = SignSpec { name: "cleveland", role: Role::Node, days: 90, hosts: &[] };
        let cert = sign(&ca.cert_pem, &ca.key_pem, &csr, &spec)?;
        use rustls_pki_types::{CertificateDer, pem::PemObject};
        let der =
            CertificateDer::from_pem_slice(cert.as_bytes()).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        assert_eq!(request_public_key(&csr)?, certificate_public_key(&der)?);
        assert_ne!(request_public_key(&other_csr)?, certificate_public_key(&der)?);
        assert!(matches!(request_public_key("not a csr"), Err(PkiError::BadRequest(_))));
        Ok(())
    }

    #[test]
    fn a_revocation_list_that_does_not_say_what_it_revokes_is_refused() -> Result<(), PkiError> {
        let fp = "AB".repeat(32);
        let good = format!(r#"[{{"name": "va", "fingerprint": "{fp}", "revoked_at": "2026-01-01T00:00:00Z"}}]"#);
        let list = parse_revocation_list(&good)?;
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].fingerprint, "ab".repeat(32), "fingerprints are matched in lowercase");
        assert!(parse_revocation_list("[]")?.is_empty());
        let entry = |name: &str, fingerprint: &str| {
            format!(r#"[{{"name": "{name}", "fingerprint": "{fingerprint}", "revoked_at": "x"}}]"#)
        };
        for bad in [
            String::new(),
            "not json".into(),
            "{}".into(),
            r#"{"revoked": []}"#.into(),
            r#"[{"name": "va"}]"#.into(),
            r#"["ab"]"#.into(),
            entry("va", "abc"),
            entry("va", &"g".repeat(64)),
            entry("va", &"a".repeat(65)),
            entry("va", &"é".repeat(32)),
            entry("Not A Name", &"a".repeat(64)),
        ] {
            assert!(matches!(parse_revocation_list(&bad), Err(PkiError::BadRevocationList(_))), "{bad:?} accepted");
        }
        Ok(())
    }
}
