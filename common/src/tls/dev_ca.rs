//! A development certificate authority (rcgen): the CA, replica, node and operator certificates
//! of one cluster, written as PEM files readable by root only (0600 in 0700 directories).
//! `dormantctl certs init` and `dormantctl dev` use it, and so does the test harness, which makes
//! one CA per test cluster. Production clusters may use any CA whose certificates carry the same
//! URI SANs (see `identity`).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{PeerIdentity, TlsError, TlsFiles};

/// A CA that can issue certificates.
pub struct DevCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn generate(what: &str, e: rcgen::Error) -> TlsError {
    TlsError::Generate {
        what: what.to_string(),
        why: e.to_string(),
    }
}

impl DevCa {
    /// A new CA with a fresh P-256 key.
    pub fn new() -> Result<Self, TlsError> {
        let what = "the CA";
        let key = KeyPair::generate().map_err(|e| generate(what, e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Dormant development CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|e| generate(what, e))?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA written before (`ca.pem`, `ca.key`).
    pub fn from_pem(cert_pem: &str, key_pem: &str, key_path: &Path) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Key {
            path: key_path.to_path_buf(),
            why: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| TlsError::Key {
            path: key_path.to_path_buf(),
            why: format!("the CA certificate beside it: {e}"),
        })?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A certificate for `identity` (its URI SAN). A replica's is also a server certificate for
    /// `hosts` (DNS names or IP addresses, as clients dial it), and so is a node's (for its
    /// tenants' endpoints); operators are clients.
    pub fn issue(&self, identity: &PeerIdentity, hosts: &[String]) -> Result<Issued, TlsError> {
        let what = identity.uri();
        let key = KeyPair::generate().map_err(|e| generate(&what, e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, what.clone());
        params.distinguished_name = dn;
        let uri = what
            .clone()
            .try_into()
            .map_err(|e: rcgen::Error| generate(&what, e))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Replicas serve gRPC; nodes serve tenants' clients (TLS on tenant endpoints, with the
        // node's own certificate unless the operator gives another).
        if matches!(identity, PeerIdentity::Replica(_) | PeerIdentity::Node(_)) {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            for host in hosts {
                let san = match host.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(
                        host.clone()
                            .try_into()
                            .map_err(|e: rcgen::Error| generate(&what, e))?,
                    ),
                };
                params.subject_alt_names.push(san);
            }
        }
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| generate(&what, e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The file names of an identity's certificate: `replica-1`, `node-a`, `operator-admin`.
pub fn file_stem(identity: &PeerIdentity) -> String {
    match identity {
        PeerIdentity::Replica(id) => format!("replica-{id}"),
        PeerIdentity::Node(n) => format!("node-{n}"),
        PeerIdentity::Operator(n) => format!("operator-{n}"),
    }
}

/// Where [`init_dir`] puts `identity`'s files in `dir`.
pub fn files_in(dir: &Path, identity: &PeerIdentity) -> TlsFiles {
    let stem = file_stem(identity);
    TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}.key")),
    }
}

/// Creates `dir` (and missing parents) as 0700; an existing `dir` is set to 0700.
pub fn private_dir(dir: &Path) -> Result<(), TlsError> {
    let write = |source| TlsError::Write {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(write)
}

/// Writes `contents` to `path` as 0600 (an existing file is replaced, never widened).
pub fn write_private(path: &Path, contents: &str) -> Result<(), TlsError> {
    let write = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    f.write_all(contents.as_bytes()).map_err(write)?;
    f.sync_all().map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

/// What [`init_dir`] makes certificates for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub identities: Vec<PeerIdentity>,
    /// DNS names and IP addresses replicas and nodes (tenant endpoints) are dialled at.
    pub hosts: Vec<String>,
}

/// Opens the CA in `dir` (`ca.pem`, `ca.key`), making a new one when there is none, then writes a
/// certificate and key for each identity requested (replacing one of the same name). Returns the
/// files written.
pub fn init_dir(dir: &Path, request: &Request) -> Result<(DevCa, Vec<PathBuf>), TlsError> {
    private_dir(dir)?;
    let (ca_cert, ca_key) = (dir.join("ca.pem"), dir.join("ca.key"));
    let mut written = Vec::new();
    let ca = if ca_cert.exists() && ca_key.exists() {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        DevCa::from_pem(&read(&ca_cert)?, &read(&ca_key)?, &ca_key)?
    } else {
        let ca = DevCa::new()?;
        write_private(&ca_key, &ca.key_pem)?;
        write_private(&ca_cert, ca.cert_pem())?;
        written.extend([ca_cert, ca_key]);
        ca
    };
    for identity in &request.identities {
        let issued = ca.issue(identity, &request.hosts)?;
        let files = files_in(dir, identity);
        write_private(&files.key, &issued.key_pem)?;
        write_private(&files.cert, &issued.cert_pem)?;
        written.extend([files.cert, files.key]);
    }
    Ok((ca, written))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{first_cert_der, TlsMaterial};
    use crate::NodeName;

    #[test]
    fn init_writes_private_files_whose_certificates_carry_their_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let node = PeerIdentity::Node(NodeName::parse("a").unwrap());
        let request = Request {
            identities: vec![PeerIdentity::Replica(1), node.clone()],
            hosts: vec!["127.0.0.1".into(), "localhost".into()],
        };
        let (_, written) = init_dir(&dir, &request).unwrap();
        assert_eq!(written.len(), 6);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in &written {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        let m = TlsMaterial::load(&files_in(&dir, &node)).unwrap();
        assert_eq!(m.identity, node);

        // Again with an operator: the same CA signs it.
        let again = Request {
            identities: vec![PeerIdentity::Operator("admin".into())],
            hosts: vec![],
        };
        let (ca, written) = init_dir(&dir, &again).unwrap();
        assert_eq!(written.len(), 2, "the CA is reused");
        let files = files_in(&dir, &PeerIdentity::Operator("admin".into()));
        let ca_pem = std::fs::read(&files.ca).unwrap();
        assert_eq!(ca.cert_pem().as_bytes(), ca_pem.as_slice());
        let der = first_cert_der(&std::fs::read(&files.cert).unwrap(), &files.cert).unwrap();
        assert_eq!(
            PeerIdentity::from_cert_der(&der).unwrap(),
            PeerIdentity::Operator("admin".into())
        );
    }
}
