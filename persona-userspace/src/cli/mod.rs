//! The `persona` command line: kubectl-style commands through the daemon's API, and
//! `persona datapath ...` for the pinned datapath without a daemon.
mod direct;
pub mod hook;
mod migrate;
mod remote;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    client::Target,
    daemon::{DEFAULT_DATA_DIR, DEFAULT_SOCKET, DaemonConfig},
    datapath::{
        compile,
        kernel::{DEFAULT_PIN_DIR, HostRouting, KernelConfig},
    },
};

#[derive(Parser, Debug)]
#[command(
    name = "persona",
    version,
    about = "Switchable network personas for virtual machines"
)]
pub struct Cli {
    /// bpffs directory holding the pinned maps and links.
    #[arg(long, global = true, env = "PERSONA_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Host interface towards the network; persona addresses are proxied on it. Give it
    /// once per uplink: a persona's gateway decides which one its traffic leaves by.
    #[arg(long, global = true, env = "PERSONA_UPLINK", value_delimiter = ',')]
    pub uplink: Vec<String>,
    /// Who forwards translated packets between the taps and the uplinks: the programs
    /// (a FIB lookup and a redirect, past the host's IP stack and its netfilter hooks) or
    /// the host's IP stack. When not given, as the pinned datapath was last told (the
    /// kernel at first).
    #[arg(long, global = true, env = "PERSONA_HOST_ROUTING", value_enum)]
    pub host_routing: Option<HostRouting>,
    /// CA certificate (PEM) to trust for an https:// server.
    #[arg(long, global = true, env = "PERSONA_CACERT")]
    pub cacert: Option<PathBuf>,
    /// The daemon: unix:/path, http://host:port or https://host:port.
    #[arg(
        long,
        global = true,
        env = "PERSONA_SERVER",
        default_value = "unix:/run/persona/persona.sock"
    )]
    pub server: Target,
    /// Bearer token; defaults to the bootstrap admin token in the data directory.
    #[arg(long, global = true, env = "PERSONA_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where the daemon keeps its store and the bootstrap admin token.
    #[arg(long, global = true, env = "PERSONA_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The only directory personas' private keys (tls.keyFile,
    /// vpn.wireguard.privateKeyFile) are read from: root's, each key 0600 or stricter.
    #[arg(long, global = true, env = "PERSONA_KEY_DIR", default_value = crate::keys::DEFAULT_KEY_DIR)]
    pub key_dir: PathBuf,
    /// Settings file: each key a flag's long name, overridden by flags and their
    /// environment variables. /etc/persona/persona.yaml when it exists.
    #[arg(long, global = true, env = "PERSONA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing's EnvFilter syntax): info for the daemon, warn otherwise.
    #[arg(long, global = true, env = "PERSONA_LOG")]
    pub log_level: Option<String>,
    /// Log lines as text or as JSON objects, one per line.
    #[arg(long, global = true, env = "PERSONA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the daemon keeps its state: the embedded file under --data-dir, or etcd.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Keep personas, devices, tokens, state and the audit log in etcd, shared by every
    /// host of a fleet: etcd://HOST:PORT[,HOST:PORT...][/PREFIX], or etcds:// for TLS.
    #[arg(long, env = "PERSONA_STORE")]
    store: Option<String>,
    /// The CA (PEM) that signed the etcd members' certificates (etcds://).
    #[arg(long, env = "PERSONA_STORE_CA", requires = "store")]
    store_ca: Option<PathBuf>,
    /// This host's client certificate (PEM) for etcd, with --store-key.
    #[arg(long, env = "PERSONA_STORE_CERT", requires_all = ["store_key", "store_ca"])]
    store_cert: Option<PathBuf>,
    #[arg(long, env = "PERSONA_STORE_KEY", requires = "store_cert")]
    store_key: Option<PathBuf>,
    /// The etcd user, for etcd with authentication on; its password is read from
    /// --store-password-file.
    #[arg(long, env = "PERSONA_STORE_USER", requires_all = ["store", "store_password_file"])]
    store_user: Option<String>,
    #[arg(long, env = "PERSONA_STORE_PASSWORD_FILE", requires = "store_user")]
    store_password_file: Option<PathBuf>,
    /// This host's name in the fleet: it runs the devices whose `host` is this name.
    /// The system's host name when not given.
    #[arg(long, env = "PERSONA_HOST", requires = "store")]
    host: Option<String>,
}

impl StoreArgs {
    fn config(&self) -> anyhow::Result<Option<crate::fleet::FleetConfig>> {
        let Some(url) = &self.store else {
            return Ok(None);
        };
        let mut config = crate::store::etcd::EtcdConfig::parse(url)
            .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p).with_context(|| format!("{flag}: reading {}", p.display()))
        };
        let tls = url.starts_with("etcds://");
        match (&self.store_ca, tls) {
            (Some(ca), true) => {
                let cert_key = match (&self.store_cert, &self.store_key) {
                    (Some(c), Some(k)) => Some((read("--store-cert", c)?, read("--store-key", k)?)),
                    _ => None,
                };
                config.tls = Some(crate::store::etcd::EtcdTls {
                    ca: read("--store-ca", ca)?,
                    cert_key,
                });
            }
            (None, true) => anyhow::bail!("--store {url}: etcds:// needs --store-ca"),
            (Some(_), false) => {
                anyhow::bail!("--store-ca is for etcds:// (TLS); --store {url} is plain")
            }
            (None, false) => {}
        }
        if let (Some(user), Some(file)) = (&self.store_user, &self.store_password_file) {
            let password = String::from_utf8(read("--store-password-file", file)?)
                .context("--store-password-file: not UTF-8")?;
            config.user = Some((user.clone(), password.trim_end_matches('\n').to_owned()));
        }
        let host = match &self.host {
            Some(h) => h.clone(),
            None => nix::unistd::gethostname()
                .context("reading the host name for --host")?
                .to_string_lossy()
                .into_owned(),
        };
        // The rule a device's spec.host follows, which must be able to name it; a '/'
        // would also split the keys kept under the host's name.
        crate::model::check_host_name(&host).map_err(|why| anyhow::anyhow!("--host: {why}"))?;
        Ok(Some(crate::fleet::FleetConfig { etcd: config, host }))
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: store, datapath, API on a Unix socket (and TCP with --listen).
    Daemon {
        /// Also serve HTTP on this address, e.g. 127.0.0.1:7070.
        #[arg(long, env = "PERSONA_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        #[arg(long, env = "PERSONA_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The group that may use the socket (its directory 0750 and the socket 0660
        /// belong to it); root's group when not given.
        #[arg(long, env = "PERSONA_SOCKET_GROUP")]
        socket_group: Option<String>,
        /// Command run after a device's TLS files change; its failure rolls back.
        #[arg(long, env = "PERSONA_TLS_HOOK")]
        tls_hook: Option<String>,
        /// Serve --listen over HTTPS with this PEM certificate chain...
        #[arg(long, env = "PERSONA_TLS_CERT", requires_all = ["tls_key", "listen"])]
        tls_cert: Option<PathBuf>,
        /// ...and this PEM private key.
        #[arg(long, env = "PERSONA_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Serve --listen as plain HTTP on an address other hosts reach (tokens then
        /// cross the network in the clear); refused without it.
        #[arg(long, env = "PERSONA_INSECURE_LISTEN")]
        insecure_listen: bool,
        /// Serve no metadata service at 169.254.169.254 (a host that reaches a cloud's own
        /// metadata service at that address): VMs' requests to it are dropped.
        #[arg(long, env = "PERSONA_NO_METADATA")]
        no_metadata: bool,
        /// Seconds a device stays in a persona before the rule engine moves it again.
        #[arg(long, env = "PERSONA_MIN_DWELL", default_value_t = 30)]
        min_dwell: u64,
        /// Seconds before the rule engine returns a device to a persona it just left.
        #[arg(long, env = "PERSONA_COOLDOWN", default_value_t = 60)]
        cooldown: u64,
        /// Let the rule engine record the shifts it would make, and make none.
        #[arg(long, env = "PERSONA_RULES_DRY_RUN")]
        rules_dry_run: bool,
        /// MaxMind-format database to find the country of geolocation signals that
        /// carry only an address.
        #[arg(long, env = "PERSONA_GEOIP_DB")]
        geoip_db: Option<PathBuf>,
        /// Seconds between looks at each device's flows for known applications.
        #[arg(long, env = "PERSONA_APP_OBSERVE_SECS", default_value_t = 5)]
        app_observe_secs: u64,
        /// A flow idle longer than this many seconds no longer shows its application.
        #[arg(long, env = "PERSONA_APP_IDLE_SECS", default_value_t = 30)]
        app_idle_secs: u64,
        /// Audit events older than this many days are removed (checked hourly).
        #[arg(long, env = "PERSONA_AUDIT_MAX_AGE_DAYS", default_value_t = 90)]
        audit_max_age_days: u64,
        /// At most this many audit events are kept, the oldest removed first.
        #[arg(long, env = "PERSONA_AUDIT_MAX_EVENTS", default_value_t = 1_000_000)]
        audit_max_events: usize,
        /// Fail every shift at this step, to test that it is undone (tests only).
        #[arg(long, value_enum, hide = true)]
        fault_at: Option<crate::node::Step>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Create or update every object in a file or directory of manifests.
    Apply {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show personas or devices.
    Get {
        #[arg(value_enum)]
        kind: KindArg,
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Delete a persona or device (a persona in use only with --force).
    Delete {
        #[arg(value_enum)]
        kind: KindArg,
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Shift DEVICE to PERSONA.
    Shift {
        device: String,
        persona: String,
        /// Show the plan and the diff, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// What open flows do: keep their address until they end, move to the new
        /// one, or be cut (TCP reset). The persona's `flows` (or keep) when not given.
        #[arg(long, value_enum)]
        flows: Option<crate::model::FlowMode>,
    },
    /// Move DEVICE to another host of the fleet without a gap: the target runs its
    /// persona, gated, and takes over at the VM's first frame there (or --cutover).
    Migrate {
        device: String,
        /// The host to move it to.
        #[arg(long, required_unless_present_any = ["cutover", "cancel"])]
        to: Option<String>,
        /// The device's interface on that host (its interface now when not given).
        #[arg(long)]
        interface: Option<String>,
        /// Take over only when asked with --cutover, not at the first frame.
        #[arg(long)]
        manual: bool,
        /// Cut the device's manual migration over now.
        #[arg(long, conflicts_with_all = ["to", "interface", "manual"])]
        cutover: bool,
        /// Call the device's migration off before its cut-over: the target lets it go
        /// and it stays where it runs.
        #[arg(long, conflicts_with_all = ["to", "interface", "manual", "cutover"])]
        cancel: bool,
        /// Return once asked, without waiting for the migration to end.
        #[arg(long)]
        no_wait: bool,
    },
    /// Persona, generation and counters of a device, or a line per device.
    Status {
        device: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// The audit log; --follow keeps printing new events.
    Events {
        #[arg(long)]
        follow: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Report context about a device to the rule engine, or stream a JSON-lines feed.
    Context {
        /// The device the flags below describe.
        device: Option<String>,
        /// Raise an alert: ID:SEVERITY[:KIND], severity low|medium|high|critical.
        #[arg(long)]
        alert: Vec<String>,
        /// Clear the alert with this id.
        #[arg(long)]
        clear: Vec<String>,
        /// ISO country code where the device is.
        #[arg(long)]
        country: Option<String>,
        /// An application now running.
        #[arg(long)]
        app: Vec<String>,
        /// An application no longer running.
        #[arg(long)]
        app_stopped: Vec<String>,
        /// The role of the user now using the device.
        #[arg(long)]
        role: Option<String>,
        /// Seconds these signals stay valid.
        #[arg(long)]
        ttl: Option<u64>,
        /// JSON lines of signals from FILE, or - for standard input.
        #[arg(long, conflicts_with = "device")]
        feed: Option<PathBuf>,
    },
    /// Live per-device packet and byte rates, refreshed until interrupted.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
        /// Stop after this many refreshes (0: never).
        #[arg(long, default_value_t = 0)]
        iterations: u64,
    },
    /// Why the rule engine wants what it wants for a device: every rule and condition.
    Explain { device: String },
    /// Manage API tokens (admin).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Make or delete a persistent tap (vnet_hdr, multi_queue) for a VM to open, with
    /// no daemon. A device with `tap:` in its spec has the daemon make its own.
    Tap {
        #[command(subcommand)]
        command: TapCommand,
    },
    /// Hooks other programs call: `persona hook libvirt` is libvirt's QEMU hook.
    Hook {
        #[command(subcommand)]
        command: HookCommand,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Check manifests without touching anything.
    Validate {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
    },
    /// Work on the pinned datapath directly, without the daemon.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    Create {
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    #[value(alias = "persona")]
    Personas,
    #[value(alias = "device")]
    Devices,
    #[value(alias = "rule")]
    Rules,
    #[value(alias = "application", alias = "apps")]
    Applications,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum TapCommand {
    Create {
        name: String,
        /// One queue instead of several (QEMU without `queues=N`).
        #[arg(long)]
        single_queue: bool,
        /// The user (number) that may open it, QEMU's; root only when not given.
        #[arg(long)]
        user: Option<u32>,
        #[arg(long)]
        group: Option<u32>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum HookCommand {
    /// libvirt's QEMU hook: reads the domain XML on standard input and, while a domain
    /// starts, waits until the daemon guards each of its interfaces that is a device.
    /// Install as /etc/libvirt/hooks/qemu.d/persona.
    Libvirt {
        domain: String,
        operation: String,
        subop: String,
        extra: Option<String>,
        /// Seconds to wait for a device to be guarded before failing the start.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatapathCommand {
    /// Attach every Device in the manifests, give each its starting persona, and stay
    /// in the foreground. Killing it leaves traffic flowing; running it again picks up.
    Run {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        /// Detach every device on exit (SIGINT/SIGTERM) instead of leaving it running.
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Attach one device from its manifest.
    Attach {
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        device: String,
    },
    /// Detach a device: programs, routes and proxies removed.
    Detach { interface: String },
    /// Remove every pin: the programs come off every device and the maps go. For a
    /// release whose maps have another layout; the daemon attaches the stored devices
    /// again when it starts.
    Reset,
    /// Make PERSONA the active persona of the device on INTERFACE.
    Shift {
        interface: String,
        persona: String,
        #[arg(short = 'f', long = "filename")]
        manifests: PathBuf,
        /// What open flows do; the persona's `flows` (or keep) when not given.
        #[arg(long, value_enum)]
        flows: Option<crate::model::FlowMode>,
    },
    /// Active generation and per-reason counters of a device.
    Status {
        interface: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Datapath { command } => direct::run(&cli, command),
        Command::Validate { manifests } => {
            let c = direct::catalog(manifests)?;
            for (name, p) in &c.personas {
                compile(p).with_context(|| format!("Persona {name:?}"))?;
            }
            let rules = crate::model::load_manifests(manifests)?
                .iter()
                .filter(|m| matches!(m, crate::model::Manifest::Rule { .. }))
                .count();
            println!(
                "{} personas, {} devices, {rules} rules: valid",
                c.personas.len(),
                c.devices.len()
            );
            Ok(())
        }
        Command::Tap { command } => match command {
            TapCommand::Create {
                name,
                single_queue,
                user,
                group,
            } => {
                let spec = crate::model::TapSpec {
                    multi_queue: !single_queue,
                    user: *user,
                    group: *group,
                };
                if crate::host::tap::create(name, &spec)? {
                    println!("{name}: made, persistent");
                } else {
                    println!("{name}: already there");
                }
                Ok(())
            }
            TapCommand::Delete { name } => {
                crate::host::tap::delete(name, &crate::model::TapSpec::default())?;
                println!("{name}: deleted");
                Ok(())
            }
        },
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "persona", &mut std::io::stdout());
            Ok(())
        }
        Command::Daemon {
            listen,
            socket,
            socket_group,
            tls_hook,
            tls_cert,
            tls_key,
            insecure_listen,
            no_metadata,
            min_dwell,
            cooldown,
            rules_dry_run,
            geoip_db,
            app_observe_secs,
            app_idle_secs,
            audit_max_age_days,
            audit_max_events,
            fault_at,
            store,
        } => {
            let fleet = store.config()?;
            if let Some(addr) = listen
                && tls_cert.is_none()
                && !addr.ip().is_loopback()
                && !insecure_listen
            {
                anyhow::bail!(
                    "--listen {addr}: plain HTTP on an address other hosts reach sends tokens in the clear; give --tls-cert and --tls-key, a loopback address, or --insecure-listen"
                );
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(crate::daemon::run(DaemonConfig {
                data_dir: cli.data_dir.clone(),
                listen: *listen,
                socket: Some(socket.clone()),
                socket_group: socket_group.clone(),
                kernel: KernelConfig {
                    pin_dir: cli.pin_dir.clone(),
                    uplinks: cli.uplink.clone(),
                    wire_host: true,
                    exclusive: true,
                    routing: cli.host_routing,
                    metadata: !no_metadata,
                },
                tls_hook: tls_hook.clone(),
                keys: crate::keys::KeyDir::new(&cli.key_dir),
                api_tls: tls_cert.clone().zip(tls_key.clone()),
                timing: crate::rules::engine::Timing {
                    dwell: jiff::SignedDuration::from_secs(*min_dwell as i64),
                    cooldown: jiff::SignedDuration::from_secs(*cooldown as i64),
                },
                rules_dry_run: *rules_dry_run,
                geoip_db: geoip_db.clone(),
                app_observe: (
                    std::time::Duration::from_secs(*app_observe_secs),
                    std::time::Duration::from_secs(*app_idle_secs),
                ),
                audit: crate::daemon::Retention {
                    max_age: std::time::Duration::from_secs(audit_max_age_days * 86_400),
                    max_events: *audit_max_events,
                },
                fault_at: *fault_at,
                fleet,
            }))
        }
        _ => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(remote::run(&cli))
        }
    }
}
