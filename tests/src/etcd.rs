//! A real etcd cluster (Debian's etcd-server) for fleet tests: its members in a
//! namespace of their own on a bridge, which each site's host joins by a veth.
//!
//! ```text
//!  etcd ns: br0 (198.19.250.1..N members) ══ st<k> ── site k's host (198.19.250.10+k)
//! ```
use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    lab::Site,
    netns::{Netns, sh},
};

/// The interface by which a site's host reaches the store.
pub const STORE_LINK: &str = "st0";

pub struct Etcd {
    pub ns: Netns,
    members: Vec<Option<Child>>,
    dirs: Vec<PathBuf>,
    joined: u32,
}

fn member_ip(i: usize) -> String {
    format!("198.19.250.{}", i + 1)
}

impl Etcd {
    /// `n` members, started and answering.
    pub fn start(n: usize) -> Self {
        let ns = Netns::new("p-etcd");
        ns.exec("ip link add br0 type bridge && ip link set br0 up");
        for i in 0..n {
            ns.exec(&format!("ip addr add {}/24 dev br0", member_ip(i)));
        }
        let mut etcd = Self {
            dirs: (0..n)
                .map(|i| {
                    // Test data on tmpfs: etcd 3.4 cannot be told to skip its fsyncs.
                    PathBuf::from(format!("/dev/shm/persona-etcd-{}-{i}", ns.name))
                })
                .collect(),
            ns,
            members: Vec::new(),
            joined: 0,
        };
        for dir in &etcd.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        etcd.members = (0..n).map(|i| Some(etcd.spawn(i, "new"))).collect();
        etcd.wait_healthy();
        etcd
    }

    fn spawn(&self, i: usize, state: &str) -> Child {
        let cluster: Vec<String> = (0..self.dirs.len())
            .map(|j| format!("e{j}=http://{}:2380", member_ip(j)))
            .collect();
        let ip = member_ip(i);
        let log = std::fs::File::create(format!("/tmp/{}-e{i}.log", self.ns.name)).expect("log");
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "etcd"])
            .args(["--name", &format!("e{i}")])
            .args(["--data-dir", self.dirs[i].to_str().unwrap()])
            .args(["--listen-client-urls", &format!("http://{ip}:2379")])
            .args(["--advertise-client-urls", &format!("http://{ip}:2379")])
            .args(["--listen-peer-urls", &format!("http://{ip}:2380")])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{ip}:2380"),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            // With authentication on, a token idle for 3 s lapses: a client that does not
            // ask for another fails every call after a pause (etcd's default is 300 s).
            .args(["--auth-token-ttl", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting etcd")
    }

    /// `etcd://` for every member, as `persona daemon --store` takes it.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = (0..self.dirs.len())
            .map(|i| format!("{}:2379", member_ip(i)))
            .collect();
        format!("etcd://{}", hosts.join(","))
    }

    fn endpoints(&self) -> String {
        let endpoints: Vec<String> = (0..self.dirs.len())
            .map(|i| format!("http://{}:2379", member_ip(i)))
            .collect();
        endpoints.join(",")
    }

    /// `etcdctl` against every member, in the etcd namespace.
    pub fn ctl(&self, args: &str) -> String {
        self.ns.exec(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints={} {args}",
            self.endpoints()
        ))
    }

    /// `etcdctl` as etcd user `user` (its password from [`Etcd::password_file`]); what
    /// it printed, and whether etcd allowed it.
    pub fn ctl_as(&self, user: &str, args: &str) -> (bool, String) {
        let password = std::fs::read_to_string(self.password_file(user)).expect("password");
        let out = self.ns.try_exec(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints={} --user {user}:{password} {args}",
            self.endpoints()
        ));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Users and roles for `hosts`, and authentication on: what an operator runs,
    /// `packaging/etcd-rbac.sh`, with passwords kept in [`Etcd::password_dir`].
    pub fn set_up_users(&self, hosts: &[&str]) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/etcd-rbac.sh");
        self.ns.exec(&format!(
            "ETCDCTL_ENDPOINTS={} sh {script} -d {} {}",
            self.endpoints(),
            self.password_dir().display(),
            hosts.join(" ")
        ));
    }

    pub fn password_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/persona-etcd-users-{}", self.ns.name))
    }

    pub fn password_file(&self, user: &str) -> PathBuf {
        self.password_dir().join(user)
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let endpoints: Vec<String> = (0..self.dirs.len())
                .filter(|&i| self.members[i].is_some())
                .map(|i| format!("http://{}:2379", member_ip(i)))
                .collect();
            let out = self.ns.try_exec(&format!(
                "ETCDCTL_API=3 etcdctl --endpoints={} endpoint health",
                endpoints.join(",")
            ));
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Connects a site's host to the members' bridge: the host reaches them on
    /// [`STORE_LINK`].
    pub fn join(&mut self, site: &Site) {
        let k = self.joined;
        self.joined += 1;
        let peer = format!("st{k}");
        sh(&format!(
            "ip link add {peer} netns {} type veth peer name {STORE_LINK} netns {}",
            self.ns.name, site.host.name
        ));
        self.ns.exec(&format!(
            "ip link set {peer} master br0 && ip link set {peer} up"
        ));
        site.host.exec(&format!(
            "ip addr add 198.19.250.{}/24 dev {STORE_LINK} && ip link set {STORE_LINK} up",
            10 + k
        ));
    }

    /// SIGKILLs the member that leads now; returns its index.
    pub fn kill_leader(&mut self) -> usize {
        let status = self.ctl("endpoint status -w json");
        let status: serde_json::Value = serde_json::from_str(&status).expect("endpoint status");
        let leader = status
            .as_array()
            .expect("a status per member")
            .iter()
            .find(|s| s["Status"]["header"]["member_id"] == s["Status"]["leader"])
            .expect("a member that leads");
        let endpoint = leader["Endpoint"].as_str().expect("its endpoint");
        let i = (0..self.dirs.len())
            .find(|&i| endpoint.contains(&format!("//{}:", member_ip(i))))
            .expect("a member of ours");
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        i
    }

    /// Stops every member at once (SIGKILL): etcd is gone for every host.
    pub fn kill_all(&mut self) {
        for m in self.members.iter_mut() {
            if let Some(mut c) = m.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts every stopped member again, on its data.
    pub fn restart_stopped(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].is_none() {
                self.members[i] = Some(self.spawn(i, "existing"));
            }
        }
        self.wait_healthy();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill_all();
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        let _ = std::fs::remove_dir_all(self.password_dir());
    }
}
