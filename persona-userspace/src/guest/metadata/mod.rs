//! The metadata service at 169.254.169.254: a VM asks what its persona is, and gets
//! the persona's certificate and key to serve with. The device is known from the
//! connection (see [`listener`]), never from anything the VM says.
pub mod listener;

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    metrics::{KeyLabels, MetadataLabels},
    model::{DeviceSpec, PersonaSpec},
    orchestrator::Orchestrator,
    store::{DeviceState, EventBody, Kind},
};
use listener::Peer;

pub const ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Long polls waiting at once, over all devices and per device; past either, one is
/// answered at once.
const LONG_POLLS: usize = 1024;
const LONG_POLLS_PER_DEVICE: usize = 4;
/// Every request carries it, as GCP's `Metadata-Flavor`: a request a guest's own web
/// server is tricked into forwarding does not.
pub const REQUIRED_HEADER: (&str, &str) = ("persona-metadata", "true");
const MAX_WAIT: u64 = 300;
const GENERATION: &str = "x-persona-generation";

struct Service {
    orchestrator: Arc<Orchestrator>,
    waiting: tokio::sync::Semaphore,
    /// Long polls waiting, by device.
    polls: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A long poll's place, given back when it ends.
struct Poll<'a> {
    service: &'a Service,
    device: String,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl<'a> Poll<'a> {
    fn take(service: &'a Service, device: &str) -> Option<Self> {
        let slot = service.waiting.try_acquire().ok()?;
        let mut polls = service.polls.lock().unwrap_or_else(|e| e.into_inner());
        let n = polls.entry(device.to_owned()).or_default();
        if *n >= LONG_POLLS_PER_DEVICE {
            return None;
        }
        *n += 1;
        Some(Self {
            service,
            device: device.to_owned(),
            _slot: slot,
        })
    }
}

impl Drop for Poll<'_> {
    fn drop(&mut self) {
        let mut polls = self.service.polls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = polls.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                polls.remove(&self.device);
            }
        }
    }
}

type Shared = State<Arc<Service>>;

/// Serves until the daemon stops.
pub async fn serve(orchestrator: Arc<Orchestrator>) -> std::io::Result<()> {
    listener::route_to_service(ADDRESS).await?;
    let tcp = listener::listen(std::net::SocketAddr::from((
        ADDRESS,
        persona_common::metadata::METADATA_PORT,
    )))?;
    tracing::info!(address = %ADDRESS, "serving the metadata service");
    let peers = listener::Peers::new(tcp, orchestrator.metrics().clone());
    let app = Router::new()
        .route("/persona/v1/identity", get(identity))
        .route("/persona/v1/tls/chain", get(chain))
        .route("/persona/v1/tls/key", get(key))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(Arc::new(Service {
            orchestrator,
            waiting: tokio::sync::Semaphore::new(LONG_POLLS),
            polls: Default::default(),
        }));
    axum::serve(peers, app.into_make_service_with_connect_info::<Peer>()).await
}

/// What an answer is counted as, and the answer.
struct Answer {
    device: String,
    response: Response,
}

type Failed = (String, StatusCode, String);

fn counted(s: &Service, path: &str, answer: Result<Answer, Failed>) -> Response {
    let (device, response) = match answer {
        Ok(a) => (a.device, a.response),
        Err((device, status, why)) => (device, (status, why).into_response()),
    };
    s.orchestrator
        .metrics()
        .metadata_requests
        .get_or_create(&MetadataLabels {
            device,
            path: path.into(),
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

fn failed(device: &str, status: StatusCode, why: impl std::fmt::Display) -> Failed {
    (device.to_owned(), status, why.to_string())
}

/// The device whose VM made the connection, for a request that says it is meant for
/// the service and was not forwarded.
async fn asking(
    s: &Service,
    peer: Peer,
    headers: &HeaderMap,
) -> Result<(String, Arc<DeviceSpec>), Failed> {
    let (device, spec) = device_of(s, peer).await?;
    let (name, value) = REQUIRED_HEADER;
    if headers.get(name).and_then(|v| v.to_str().ok()) != Some(value) {
        return Err(failed(
            &device,
            StatusCode::FORBIDDEN,
            format!("the request needs the header \"{name}: {value}\""),
        ));
    }
    if headers.contains_key("x-forwarded-for") || headers.contains_key(header::FORWARDED) {
        return Err(failed(
            &device,
            StatusCode::FORBIDDEN,
            "a forwarded request is refused",
        ));
    }
    Ok((device, spec))
}

/// The device whose VM made the connection.
async fn device_of(s: &Service, peer: Peer) -> Result<(String, Arc<DeviceSpec>), Failed> {
    let gone = || failed("", StatusCode::NOT_FOUND, "no device is served from here");
    let ifindex = s
        .orchestrator
        .datapath()
        .call(move |dp| dp.metadata_device(peer.0))
        .await
        .map_err(|e| failed("", StatusCode::SERVICE_UNAVAILABLE, e))?
        .ok_or_else(gone)?;
    s.orchestrator.device_at(ifindex).ok_or_else(gone)
}

fn state_of(s: &Service, device: &str) -> Result<(DeviceState, PersonaSpec), Failed> {
    let store = s.orchestrator.store();
    let unavailable = |e| failed(device, StatusCode::SERVICE_UNAVAILABLE, e);
    let state = store
        .device_state(device)
        .map_err(unavailable)?
        .ok_or_else(|| {
            failed(
                device,
                StatusCode::NOT_FOUND,
                "the device has no persona yet",
            )
        })?;
    let record = store
        .get(Kind::Persona, &state.persona)
        .map_err(unavailable)?
        .ok_or_else(|| failed(device, StatusCode::NOT_FOUND, "its persona is gone"))?;
    let persona = serde_json::from_value(record.spec)
        .map_err(|e| failed(device, StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok((state, persona))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityQuery {
    /// Answer once the device runs another generation than this one.
    after: Option<u64>,
    /// Seconds to wait for it; 60 when not given.
    wait: Option<u64>,
}

async fn identity(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    q: Result<Query<IdentityQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let answer = async {
        let (device, spec) = asking(&s, peer, &headers).await?;
        let Query(q) = q.map_err(|e| failed(&device, StatusCode::BAD_REQUEST, e.body_text()))?;
        let wait = q.wait.unwrap_or(60);
        if wait > MAX_WAIT {
            return Err(failed(
                &device,
                StatusCode::BAD_REQUEST,
                format!("wait: at most {MAX_WAIT} seconds"),
            ));
        }
        let mut events = s.orchestrator.subscribe();
        let mut current = state_of(&s, &device);
        let unchanged = |c: &Result<(DeviceState, PersonaSpec), Failed>| {
            q.after.is_some() && c.as_ref().ok().map(|(st, _)| st.generation) == q.after
        };
        if unchanged(&current)
            && let Some(_poll) = Poll::take(&s, &device)
        {
            let _ = tokio::time::timeout(Duration::from_secs(wait), async {
                loop {
                    match events.recv().await {
                        Ok(e) if e.body.device.as_deref() != Some(device.as_str()) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            return std::future::pending().await;
                        }
                        _ => {}
                    }
                    current = state_of(&s, &device);
                    if !unchanged(&current) {
                        return;
                    }
                }
            })
            .await;
            // The peer address may be another device's by now (this one went, and its
            // slot was given again): that one is not told this one's identity.
            if device_of(&s, peer).await.map(|(d, _)| d).as_ref() != Ok(&device) {
                return Err(failed(&device, StatusCode::GONE, "the device is gone"));
            }
        }
        let (state, persona) = current?;
        let response = Json(describe(&device, &spec, &state, &persona)).into_response();
        Ok(Answer { device, response })
    }
    .await;
    counted(&s, "identity", answer)
}

fn describe(device: &str, spec: &DeviceSpec, state: &DeviceState, persona: &PersonaSpec) -> Value {
    let addresses: Vec<String> = if state.leases.is_empty() {
        persona.addresses.iter().map(ToString::to_string).collect()
    } else {
        state.leases.iter().map(ToString::to_string).collect()
    };
    json!({
        "device": device,
        "persona": state.persona,
        "generation": state.generation,
        "since": state.since,
        "addresses": addresses,
        "gateway": persona.gateway,
        "dns": persona.dns,
        "inner": {
            "addressV4": spec.inner_v4,
            "addressV6": spec.inner_v6,
            "gatewayV4": spec.gateway_v4,
            "gatewayV6": spec.gateway_v6,
        },
        "tls": persona.tls.as_ref().map(|t| json!({
            "names": t.names,
            "keyServed": spec.serves_key(),
        })),
    })
}

/// The generation directory the device's TLS files are in force from, and its number.
fn tls_in_force(s: &Service, device: &str) -> Result<(PathBuf, u64), Failed> {
    let none = || {
        failed(
            device,
            StatusCode::NOT_FOUND,
            "the persona has no TLS certificate",
        )
    };
    let dir = std::fs::canonicalize(s.orchestrator.tls_files(device)).map_err(|_| none())?;
    let generation = dir
        .file_name()
        .and_then(|n| n.to_str()?.strip_prefix('g')?.parse().ok())
        .ok_or_else(none)?;
    Ok((dir, generation))
}

/// One of the files in force, read from the generation it names: a shift meanwhile
/// prunes that generation, and the read is tried again on the next.
fn read_tls(s: &Service, device: &str, file: &str) -> Result<(Vec<u8>, u64), Failed> {
    for _ in 0..3 {
        let (dir, generation) = tls_in_force(s, device)?;
        if let Ok(bytes) = std::fs::read(dir.join(file)) {
            return Ok((bytes, generation));
        }
    }
    Err(failed(
        device,
        StatusCode::SERVICE_UNAVAILABLE,
        "the TLS files are changing: try again",
    ))
}

fn pem(device: String, bytes: Vec<u8>, generation: u64) -> Answer {
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    headers.insert(GENERATION, HeaderValue::from(generation));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Answer { device, response }
}

async fn chain(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let (device, _) = asking(&s, peer, &headers).await?;
        let (bytes, generation) = read_tls(&s, &device, "chain.pem")?;
        Ok(pem(device, bytes, generation))
    }
    .await;
    counted(&s, "tls/chain", answer)
}

/// The key is handed over only once the audit log holds that it was.
async fn key(
    State(s): Shared,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> Response {
    let answer = async {
        let (device, spec) = asking(&s, peer, &headers).await?;
        if !spec.serves_key() {
            return Err(failed(
                &device,
                StatusCode::FORBIDDEN,
                "the device's spec.metadata.serveKey is false",
            ));
        }
        let (bytes, generation) = read_tls(&s, &device, "key.pem")?;
        let persona = s
            .orchestrator
            .store()
            .device_state(&device)
            .ok()
            .flatten()
            .filter(|st| st.generation == generation)
            .map(|st| st.persona);
        let orchestrator = s.orchestrator.clone();
        let body = EventBody {
            kind: "tls-key".into(),
            actor: format!("metadata:{device}"),
            device: Some(device.clone()),
            from: None,
            to: persona.clone(),
            generation: Some(generation),
            result: "served".into(),
            duration_us: None,
            detail: Value::Null,
        };
        tokio::task::spawn_blocking(move || orchestrator.record(body))
            .await
            .map_err(|e| failed(&device, StatusCode::INTERNAL_SERVER_ERROR, e))?
            .map_err(|e| failed(&device, StatusCode::SERVICE_UNAVAILABLE, e))?;
        s.orchestrator
            .metrics()
            .metadata_keys
            .get_or_create(&KeyLabels {
                device: device.clone(),
                persona: persona.unwrap_or_default(),
            })
            .inc();
        Ok(pem(device, bytes, generation))
    }
    .await;
    counted(&s, "tls/key", answer)
}
