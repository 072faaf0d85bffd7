//! `persona daemon`: the store, the datapath, the orchestrator and the API, together.
use std::{
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::{
    api::{self, AppState},
    auth::Auth,
    datapath::{
        kernel::{KernelConfig, KernelDatapath},
        worker::DatapathHandle,
    },
    host::Host,
    node::Node,
    orchestrator::Orchestrator,
    rules::{engine::Timing, runner::RuleEngine},
    store::{Role, Store, embedded::EmbeddedStore, etcd::EtcdStore},
    tls_applier::TlsApplier,
};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/persona";
pub const DEFAULT_SOCKET: &str = "/run/persona/persona.sock";

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub data_dir: PathBuf,
    pub listen: Option<SocketAddr>,
    pub socket: Option<PathBuf>,
    /// The group the socket and its directory belong to (root's when `None`).
    pub socket_group: Option<String>,
    pub kernel: KernelConfig,
    /// Run after a device's TLS files changed, with PERSONA_DEVICE, PERSONA_PERSONA,
    /// PERSONA_GENERATION and PERSONA_TLS_DIR set; failing rolls the shift back.
    pub tls_hook: Option<String>,
    /// The only directory personas' private keys are read from.
    pub keys: crate::keys::KeyDir,
    /// Serve the TCP listener over TLS with this certificate chain and key (PEM).
    pub api_tls: Option<(PathBuf, PathBuf)>,
    pub timing: Timing,
    /// Record the shifts the rule engine would make, make none.
    pub rules_dry_run: bool,
    /// MaxMind-format database for geolocation signals that carry only an address.
    pub geoip_db: Option<PathBuf>,
    /// How often flows are read for applications, and how idle a flow may be to count.
    pub app_observe: (std::time::Duration, std::time::Duration),
    pub audit: Retention,
    /// Fail every shift at this step (tests of the undo).
    pub fault_at: Option<crate::node::Step>,
    /// etcd and this host's name there, for a fleet; the embedded store under
    /// `data_dir` when `None`.
    pub fleet: Option<crate::fleet::FleetConfig>,
}

/// How long audit events are kept: those older than `max_age` go, and the oldest
/// beyond `max_events`.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age: std::time::Duration,
    pub max_events: usize,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            max_age: std::time::Duration::from_secs(90 * 86_400),
            max_events: 1_000_000,
        }
    }
}

pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// The first start has no tokens: create an admin token, readable by root only.
fn bootstrap_admin(auth: &Auth, data_dir: &Path) -> anyhow::Result<()> {
    if !auth.list()?.is_empty() {
        return Ok(());
    }
    let (record, token) = auth.create(Role::Admin, "bootstrap admin (created on first start)")?;
    let path = admin_token_path(data_dir);
    // Made with its mode, never readable by others for an instant; one left by an
    // earlier store goes first.
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, format!("{token}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    info!(id = %record.id, path = %path.display(), "created the bootstrap admin token");
    Ok(())
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    // Settings that can be wrong are checked before anything is set up.
    let socket_gid = match &config.socket_group {
        Some(name) => Some(
            nix::unistd::Group::from_name(name)
                .with_context(|| format!("looking up the group {name}"))?
                .with_context(|| format!("--socket-group: no group named {name:?}"))?
                .gid,
        ),
        None => None,
    };
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(config.keys.path())
        .with_context(|| format!("creating {}", config.keys.path().display()))?;
    let (store, fleet): (Arc<dyn Store>, _) = match &config.fleet {
        Some(f) => {
            let (etcd, host) = (f.etcd.clone(), f.host.clone());
            let store = Arc::new(
                tokio::task::spawn_blocking(move || EtcdStore::connect(&etcd, &host)).await??,
            );
            tracing::info!(endpoints = ?store.endpoints(), prefix = store.prefix(), host = f.host, "the store is etcd");
            let fleet = Arc::new(crate::fleet::Fleet::new(f.host.clone(), store.clone()));
            let announced = fleet.clone();
            tokio::task::spawn_blocking(move || announced.announce()).await??;
            (store as Arc<dyn Store>, Some(fleet))
        }
        None => (
            Arc::new(EmbeddedStore::open(&config.data_dir.join("store.redb"))?),
            None,
        ),
    };
    let kernel = config.kernel.clone();
    let keys = config.keys.clone();
    let host_record = crate::host::sysctl::record_for(&kernel.pin_dir);
    let datapath = DatapathHandle::spawn(move || {
        let host = Host::new(&kernel.uplinks, Some(host_record))?.with_keys(keys);
        Ok(Node::new(
            Box::new(KernelDatapath::open(kernel)?),
            Box::new(host),
        ))
    })?;
    let (events, _) = broadcast::channel(1024);
    let auth = Auth::new(store.clone());
    bootstrap_admin(&auth, &config.data_dir)?;
    let tls = TlsApplier::new(
        config.data_dir.join("tls"),
        config.tls_hook.clone(),
        config.keys.clone(),
    );
    let orchestrator = Orchestrator::new(
        store.clone(),
        datapath,
        events,
        tls,
        Arc::new(crate::metrics::Metrics::default()),
    )
    .with_fault(config.fault_at);
    let orchestrator = Arc::new(match &fleet {
        Some(f) => orchestrator.with_fleet(f.clone()),
        None => orchestrator,
    });
    // Following interfaces before reconciling: a VM that starts or stops meanwhile is
    // not missed.
    tokio::spawn(crate::links::follow(orchestrator.clone()));
    let dhcp = orchestrator.clone();
    tokio::spawn(async move {
        if let Err(e) = crate::guest::responder::serve(dhcp).await {
            tracing::error!(error = %e, "the DHCP responder stopped: VMs get no DHCP answers");
        }
    });
    if config.kernel.metadata {
        let metadata = orchestrator.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::guest::metadata::serve(metadata).await {
                tracing::error!(error = %e, "the metadata service stopped: VMs get no answers from 169.254.169.254");
            }
        });
    }
    orchestrator
        .reconcile()
        .await
        .context("reconciling stored devices")?;
    if let Some(f) = &fleet {
        f.clone().serve(orchestrator.clone());
    }
    let geoip = config
        .geoip_db
        .as_deref()
        .map(crate::rules::geoip::GeoIp::open)
        .transpose()?;
    let engine = RuleEngine::new(
        orchestrator.clone(),
        config.timing,
        config.rules_dry_run,
        geoip,
    )?;
    tokio::spawn(engine.clone().run());
    if let Some(f) = &fleet {
        f.feed(engine.clone());
    }
    if let Some(ring) = orchestrator
        .datapath()
        .call(|dp| Ok(dp.take_events()))
        .await?
    {
        let watcher = crate::security::Watcher::new(orchestrator.clone(), engine.clone());
        tokio::spawn(watcher.run(ring));
    }
    tokio::spawn(
        engine
            .clone()
            .observe_applications(config.app_observe.0, config.app_observe.1),
    );
    tokio::spawn(sweep(orchestrator.clone()));
    let app = api::router(Arc::new(AppState {
        auth,
        orchestrator: orchestrator.clone(),
        engine,
        waiting: tokio::sync::Semaphore::new(api::LONG_POLLS),
    }));

    let mut servers = tokio::task::JoinSet::new();
    match (config.listen, &config.api_tls) {
        (Some(addr), Some((cert, key))) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                shutdown().await;
                stopper.graceful_shutdown(None);
            });
            let server = axum_server::bind_rustls(addr, tls).handle(handle.clone());
            let app = app.clone();
            servers.spawn(async move { server.serve(app.into_make_service()).await });
            handle
                .listening()
                .await
                .with_context(|| format!("listening on {addr}"))?;
            info!(%addr, "serving HTTPS");
        }
        (Some(addr), None) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            info!(%addr, "serving HTTP");
            servers.spawn(
                axum::serve(listener, app.clone())
                    .with_graceful_shutdown(shutdown())
                    .into_future(),
            );
        }
        (None, _) => {}
    }
    if let Some(path) = &config.socket {
        // A directory made here is 0750: the socket is bound before its own mode is
        // set, and nobody outside the group reaches it meanwhile.
        if let Some(dir) = path.parent()
            && !dir.exists()
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
            if socket_gid.is_some() {
                nix::unistd::chown(dir, None, socket_gid)
                    .with_context(|| format!("giving {} to the socket's group", dir.display()))?;
            }
        }
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listening on {}", path.display()))?;
        nix::unistd::chown(path, None, socket_gid)
            .with_context(|| format!("giving {} to the socket's group", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
        info!(path = %path.display(), "serving on the Unix socket");
        servers.spawn(
            axum::serve(listener, app.clone())
                .with_graceful_shutdown(shutdown())
                .into_future(),
        );
    }
    // Pruned before the daemon says it is ready: what it serves is within retention.
    prune_audit_once(&store, config.audit).await;
    println!("ready");
    crate::service::ready(store.list(crate::store::Kind::Device)?.len());
    tokio::spawn(crate::service::watchdog(orchestrator.clone()));
    tokio::spawn(prune_audit(store, config.audit));
    while let Some(r) = servers.join_next().await {
        r??;
    }
    Ok(())
}

const PRUNE_BATCH: usize = 10_000;

/// The audit log is pruned at start and then hourly.
async fn prune_audit(store: Arc<dyn Store>, keep: Retention) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    // The first tick is now: the start's pruning is done.
    tick.tick().await;
    loop {
        tick.tick().await;
        prune_audit_once(&store, keep).await;
    }
}

async fn prune_audit_once(store: &Arc<dyn Store>, keep: Retention) {
    let age = jiff::SignedDuration::try_from(keep.max_age).unwrap_or(jiff::SignedDuration::MAX);
    let before = jiff::Timestamp::now()
        .checked_sub(age)
        .unwrap_or(jiff::Timestamp::MIN);
    // In batches, off the async threads: writes (shifts among them) go on between.
    let mut removed = 0;
    loop {
        let store = store.clone();
        let batch = tokio::task::spawn_blocking(move || {
            store.prune_events(before, keep.max_events, PRUNE_BATCH)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
        match batch {
            Ok(n) => {
                removed += n;
                if n < PRUNE_BATCH {
                    break;
                }
            }
            Err(e) => {
                warn!(error = %e, "pruning the audit log");
                break;
            }
        }
    }
    if removed > 0 {
        info!(removed, "pruned the audit log");
    }
}

/// How often connection tracking is swept: the delay between a kept flow's end and
/// the release of the address it held.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn sweep(orchestrator: Arc<Orchestrator>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = orchestrator.sweep().await {
            warn!(error = %e, "sweeping connection tracking");
        }
    }
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    crate::service::stopping();
}
