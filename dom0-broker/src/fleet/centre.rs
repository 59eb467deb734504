//! A connection to the operations centre: TLS with a client certificate (rustls, ring), a user
//! and its password, a client id bound to that user, and the cluster's nodes tried in turn. Used
//! by the forwarder (a host) and by the operator's tools.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, NetworkOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What is needed to reach the centre.
#[derive(Debug, Clone)]
pub struct CentreAccess {
    /// The cluster's nodes (`HOST:PORT`), tried in turn.
    pub addresses: Vec<(String, u16)>,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub username: String,
    pub password_file: PathBuf,
}

/// Why a connection to the centre cannot even be tried.
#[derive(Debug, thiserror::Error)]
pub enum CentreError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
}

fn file_error(path: &Path, message: impl ToString) -> CentreError {
    CentreError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// A password file's first line.
pub fn read_password(path: &Path) -> Result<String, CentreError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let pw = text.lines().next().unwrap_or("").trim_end().to_owned();
    if pw.is_empty() {
        return Err(file_error(path, "empty password file"));
    }
    Ok(pw)
}

/// The TLS client configuration: the centre's CA as the only root, this party's certificate.
pub fn tls_config(access: &CentreAccess) -> Result<Arc<rustls::ClientConfig>, CentreError> {
    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&access.ca_file)
        .map_err(|e| file_error(&access.ca_file, e))?;
    for ca in cas {
        let ca = ca.map_err(|e| file_error(&access.ca_file, e))?;
        roots.add(ca).map_err(|e| file_error(&access.ca_file, e))?;
    }
    if roots.is_empty() {
        return Err(file_error(&access.ca_file, "no certificate"));
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&access.cert_file)
        .map_err(|e| file_error(&access.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&access.cert_file, e))?;
    if chain.is_empty() {
        return Err(file_error(&access.cert_file, "no certificate"));
    }
    let key = PrivateKeyDer::from_pem_file(&access.key_file)
        .map_err(|e| file_error(&access.key_file, e))?;
    // ring: no cmake in the build (aws-lc-rs needs it). rustls deprecates it for lacking
    // post-quantum key exchange, which the centre (RabbitMQ on Erlang 25) does not offer either.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CentreError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| CentreError::Tls(e.to_string()))?;
    Ok(Arc::new(config))
}

/// Ready-made options for each node of the centre, in turn.
#[derive(Debug, Clone)]
pub struct Centre {
    options: Vec<MqttOptions>,
    next: usize,
}

impl Centre {
    /// Reads the TLS files and the password once; `clean_session` false for a host (its
    /// commands wait for it at the centre), true for an operator's one-shot tool.
    pub fn new(
        access: &CentreAccess,
        client_id: &str,
        keepalive: Duration,
        clean_session: bool,
        max_packet: usize,
    ) -> Result<Centre, CentreError> {
        if access.addresses.is_empty() {
            return Err(CentreError::Tls("no address of the centre".into()));
        }
        let tls = tls_config(access)?;
        let password = read_password(&access.password_file)?;
        let options = access
            .addresses
            .iter()
            .map(|(host, port)| {
                let mut o = MqttOptions::new(client_id, host.clone(), *port);
                o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                    tls.clone(),
                )));
                o.set_credentials(access.username.clone(), password.clone());
                o.set_keep_alive(keepalive);
                o.set_clean_session(clean_session);
                o.set_max_packet_size(max_packet, max_packet);
                o
            })
            .collect();
        Ok(Centre { options, next: 0 })
    }

    /// The options of the next node to try.
    pub fn next_options(&mut self) -> MqttOptions {
        let o = self.options[self.next % self.options.len()].clone();
        self.next = (self.next + 1) % self.options.len();
        o
    }

    /// Network options of every connection to the centre: no Nagle (a command and its answer are
    /// small messages; Nagle and a delayed ACK cost 40 ms a hop).
    pub fn network_options() -> NetworkOptions {
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(5);
        net
    }

    /// The node the options name, for logs.
    pub fn describe(o: &MqttOptions) -> String {
        let (h, p) = o.broker_address();
        format!("{h}:{p}")
    }
}
