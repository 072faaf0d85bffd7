//! The CLI's side of the API: HTTP/1.1 over TCP or the daemon's Unix socket.
use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, Clone)]
pub enum Target {
    Tcp(String),
    Https(String),
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            Ok(Target::Unix(path.into()))
        } else if let Some(rest) = s.strip_prefix("http://") {
            Ok(Target::Tcp(rest.trim_end_matches('/').into()))
        } else if let Some(rest) = s.strip_prefix("https://") {
            Ok(Target::Https(rest.trim_end_matches('/').into()))
        } else {
            Err(format!(
                "{s:?}: expected unix:/path, http://host:port or https://host:port"
            ))
        }
    }
}

pub struct Client {
    pub target: Target,
    pub token: Option<String>,
    /// CA certificates to trust for https (PEM); none means nothing is trusted.
    pub cacert: Option<std::path::PathBuf>,
}

/// An API error, as the daemon said it.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub message: String,
}

/// One kept-alive HTTP/1.1 connection to the daemon: many calls, one handshake (a
/// feed, a benchmark).
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    token: Option<String>,
}

impl Connection {
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        let body = body.map(serde_json::to_vec).transpose()?.map(Bytes::from);
        let req = request(self.token.as_deref(), method, path, body)?;
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        read(response).await
    }

    /// A call with its body already serialized, answered as sent (a benchmark's load,
    /// made before the clock starts).
    pub async fn call_raw(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let body = (!body.is_empty()).then_some(body);
        let req = request(self.token.as_deref(), method, path, body)?;
        self.sender.ready().await?;
        let response = self.sender.send_request(req).await?;
        let status = response.status();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }
}

fn request(
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "persona");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    Ok(req.body(Full::new(body.unwrap_or_default()))?)
}

impl Client {
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Value)> {
        self.connect().await?.call(method, path, body).await
    }

    /// A connection for many calls.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let unreachable =
            |what: &str| format!("connecting to {what}: is `persona daemon` running?");
        let sender = match &self.target {
            Target::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| unreachable(addr))?;
                handshake(stream).await?
            }
            Target::Https(addr) => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| unreachable(addr))?;
                let host = addr
                    .rsplit_once(':')
                    .map_or(addr.as_str(), |(h, _)| h)
                    .trim_matches(['[', ']']);
                let tls = self
                    .tls_connector()?
                    .connect(server_name(host)?, stream)
                    .await
                    .with_context(|| format!("TLS with {addr}"))?;
                handshake(tls).await?
            }
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| unreachable(&path.display().to_string()))?;
                handshake(stream).await?
            }
        };
        Ok(Connection {
            sender,
            token: self.token.clone(),
        })
    }

    fn tls_connector(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        let mut roots = rustls::RootCertStore::empty();
        if let Some(path) = &self.cacert {
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("reading {}", path.display()))?
            {
                roots.add(cert?)?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )))
    }

    /// Like [`call`](Self::call), but a non-2xx answer is an error carrying its message.
    pub async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method, path, body).await?;
        if !status.is_success() {
            let message = value["error"]
                .as_str()
                .unwrap_or("request failed")
                .to_owned();
            return Err(ApiFailure { status, message }.into());
        }
        Ok(value)
    }
}

fn server_name(host: &str) -> anyhow::Result<rustls_pki_types::ServerName<'static>> {
    Ok(rustls_pki_types::ServerName::try_from(host.to_owned())?)
}

async fn handshake<S>(
    stream: S,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn read(
    response: hyper::Response<hyper::body::Incoming>,
) -> anyhow::Result<(StatusCode, Value)> {
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if body.is_empty() {
        return Ok((status, Value::Null));
    }
    match serde_json::from_slice(&body) {
        Ok(v) => Ok((status, v)),
        Err(_) if !status.is_success() => Ok((
            status,
            serde_json::json!({"error": String::from_utf8_lossy(&body)}),
        )),
        Err(e) => bail!("the daemon answered something that is not JSON: {e}"),
    }
}
