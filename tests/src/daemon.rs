//! `persona daemon` running in a lab's host namespace, reached over its Unix socket.
use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
};

use hyper::Method;
use persona::client::{Client, Target};
use serde_json::Value;

use crate::lab::{Site, UPLINK, persona_args, persona_bin, stdout_of_success};

/// A device spec's last line that has persona make its tap.
pub const TAP: &str = "  tap: { multiQueue: true }\n";

pub struct Daemon {
    child: Child,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    host_ns: String,
    pin_dir: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    pub admin: String,
}

impl Daemon {
    pub fn start(lab: &Site) -> Self {
        Self::start_with(lab, &[])
    }

    /// With extra `persona daemon` arguments.
    pub fn start_with(lab: &Site, extra: &[&str]) -> Self {
        Self::start_with_env(lab, extra, &[])
    }

    /// With extra arguments and environment variables.
    pub fn start_with_env(lab: &Site, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_in(lab, extra, env, None)
    }

    /// With its data directory (store, socket, tokens) in `data_dir`, made afresh,
    /// rather than under /tmp.
    pub fn start_in(
        lab: &Site,
        extra: &[&str],
        env: &[(&str, &str)],
        data_dir: Option<PathBuf>,
    ) -> Self {
        let mut d = Self::prepare(lab, extra, env, data_dir);
        d.restart();
        d.admin = std::fs::read_to_string(d.data_dir.join("admin.token"))
            .expect("bootstrap admin token")
            .trim()
            .to_owned();
        d
    }

    /// A host of a fleet whose store is `store` (`etcd://...`). The first host makes
    /// the fleet's admin token; the others are given it (`admin`), as an operator
    /// copies it.
    pub fn start_in_fleet(lab: &Site, store: &str, admin: Option<&str>, extra: &[&str]) -> Self {
        let mut args = vec!["--store", store];
        args.extend_from_slice(extra);
        let mut d = Self::prepare(lab, &args, &[], None);
        if let Some(token) = admin {
            std::fs::create_dir_all(&d.data_dir).expect("data dir");
            std::fs::write(d.data_dir.join("admin.token"), token).expect("admin token");
        }
        d.restart();
        d.admin = std::fs::read_to_string(d.data_dir.join("admin.token"))
            .expect("the fleet's admin token")
            .trim()
            .to_owned();
        d
    }

    fn prepare(
        lab: &Site,
        extra: &[&str],
        env: &[(&str, &str)],
        data_dir: Option<PathBuf>,
    ) -> Self {
        let data_dir = data_dir
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/persona-test-data-{}", lab.host.name)));
        let _ = std::fs::remove_dir_all(&data_dir);
        Self {
            child: Command::new("true").spawn().expect("placeholder"),
            socket: data_dir.join("persona.sock"),
            data_dir,
            host_ns: lab.host.name.clone(),
            pin_dir: lab.pin_dir.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            admin: String::new(),
        }
    }

    /// Restarts it with other extra `persona daemon` arguments.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Starts the daemon process (again) and waits until it says it is ready.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host_ns))
            .arg(persona_bin())
            .args([
                "--pin-dir",
                self.pin_dir.to_str().unwrap(),
                "--uplink",
                UPLINK,
            ])
            .args(["--data-dir", self.data_dir.to_str().unwrap()])
            .args(["--key-dir", self.key_dir().to_str().unwrap()])
            .args(["daemon", "--socket", self.socket.to_str().unwrap()])
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            // Its log, info and up, kept out of the tests' output.
            .stderr(self.log())
            .spawn()
            .expect("starting persona daemon");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let first = lines.next().and_then(Result::ok);
        assert_eq!(
            first.as_deref(),
            Some("ready"),
            "the daemon did not get ready"
        );
        std::thread::spawn(move || for _ in lines {});
        self.child = child;
    }

    /// The daemon's resident memory, from /proc.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the daemon's status")
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// What the daemon's store takes on disk: its database and its log.
    pub fn store_bytes(&self) -> u64 {
        ["store.redb", "store.wal"]
            .iter()
            .map(|f| std::fs::metadata(self.data_dir.join(f)).map_or(0, |m| m.len()))
            .sum()
    }

    /// The daemon's key directory: the only place personas' keys are read from.
    pub fn key_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// Writes a private key into the key directory as an operator would (root's, 0600);
    /// its path, for a persona's `keyFile`.
    pub fn put_key(&self, name: &str, bytes: &[u8]) -> PathBuf {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        std::fs::create_dir_all(self.key_dir()).expect("the key directory");
        let path = self.key_dir().join(name);
        let _ = std::fs::remove_file(&path);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("writing a key");
        path
    }

    fn log(&self) -> std::fs::File {
        std::fs::create_dir_all(&self.data_dir).expect("the data directory");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.join("daemon.log"))
            .expect("the daemon's log")
    }

    /// SIGTERM, and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.child.wait().expect("reaping");
    }

    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
    }

    pub fn client(&self, token: Option<&str>) -> Client {
        Client {
            target: Target::Unix(self.socket.clone()),
            token: token.map(str::to_owned),
            cacert: None,
        }
    }

    /// One API call, blocking: the status and the JSON body.
    pub fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (status, value) = rt
            .block_on(self.client(token).call(method, path, body))
            .expect("HTTP call");
        (status.as_u16(), value)
    }

    pub fn admin(&self, method: Method, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call(Some(&self.admin.clone()), method, path, body)
    }

    /// Runs the `persona` CLI against this daemon.
    pub fn cli(&self, args: &str) -> Output {
        Command::new(persona_bin())
            .args([
                "--server",
                &format!("unix:{}", self.socket.display()),
                "--data-dir",
                self.data_dir.to_str().unwrap(),
            ])
            .args(persona_args(args))
            .output()
            .expect("running persona")
    }

    /// /metrics in the classic text format, as curl (and promtool) read it.
    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket", self.socket.to_str().unwrap()])
            .args([
                "-H",
                &format!("Authorization: Bearer {}", self.admin),
                "http://persona/metrics",
            ])
            .output()
            .expect("curl");
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    /// `persona apply` of manifests given as text.
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let path = self.data_dir.join("applied.yaml");
        std::fs::write(&path, yaml).expect("writing the manifests");
        self.cli_ok(&format!("apply -f {}", path.display()))
    }

    pub fn cli_ok(&self, args: &str) -> String {
        stdout_of_success(args, self.cli(args))
    }
}

/// The sum of every series of `name` whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| l.split_once("} "))
        .filter(|(set, _)| {
            labels
                .iter()
                .all(|(k, v)| set.split(',').any(|kv| kv == format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v.trim().parse::<u64>().expect("a counter value"))
        .sum()
}

/// The value of one series in a scrape, e.g. `name{label="x"}`.
pub fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test's daemon log stays for reading.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}
