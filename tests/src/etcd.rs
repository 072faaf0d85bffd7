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

    /// `etcdctl` against every member, in the etcd namespace.
    pub fn ctl(&self, args: &str) -> String {
        let endpoints: Vec<String> = (0..self.dirs.len())
            .map(|i| format!("http://{}:2379", member_ip(i)))
            .collect();
        self.ns.exec(&format!(
            "ETCDCTL_API=3 etcdctl --endpoints={} {args}",
            endpoints.join(",")
        ))
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
    }
}
