//! Hosts of one fleet on one machine: three etcd members, a daemon per host in its own
//! host namespace, one outside network that every host's uplink is on (so that an
//! address can move from one host to another), and a VM namespace behind each host.
use crate::{
    daemon::Daemon,
    etcd::Etcd,
    lab::{OUTSIDE, PERSONA_GATEWAY, Site, UPLINK, VM_CONFIG, VM_IFACE},
    netns::{Netns, sh},
};

pub struct FleetLab {
    /// Dropped first: the daemons, then the namespaces, then etcd.
    pub daemons: Vec<Daemon>,
    pub hosts: Vec<String>,
    /// `vms[i]` is behind `sites[i]`, on its [`VM_IFACE`].
    pub vms: Vec<Netns>,
    /// `sites[0].out` is the outside of every host.
    pub sites: Vec<Site>,
    pub etcd: Etcd,
}

impl FleetLab {
    /// A host per name, each with its daemon (`--host NAME`) and one VM.
    pub fn new(hosts: &[&str]) -> Self {
        Self::build(hosts, false)
    }

    /// As [`FleetLab::new`], on etcd with authentication on as `packaging/etcd-rbac.sh`
    /// sets it up: the first host's daemon is the fleet's admin user
    /// (`persona-admin`), every other one its own `persona-host-NAME`.
    pub fn with_etcd_users(hosts: &[&str]) -> Self {
        Self::build(hosts, true)
    }

    fn build(hosts: &[&str], users: bool) -> Self {
        let mut etcd = Etcd::start(3);
        let sites: Vec<Site> = hosts.iter().map(|_| Site::new()).collect();
        let out = &sites[0].out;
        out.exec(&format!(
            "ip link add br0 type bridge && ip link set br0 up && ip addr flush dev eth0 && ip -6 addr flush dev eth0 && ip link set eth0 master br0 && ip addr add {OUTSIDE}/24 dev br0 && ip addr add {PERSONA_GATEWAY}/32 dev br0 && ip route add 203.0.113.0/24 dev br0 src {OUTSIDE}"
        ));
        for (i, site) in sites.iter().enumerate().skip(1) {
            let (h, o) = (&site.host.name, &out.name);
            site.host.exec(&format!("ip link del {UPLINK}"));
            sh(&format!(
                "ip link add {UPLINK} netns {h} type veth peer name up{i} netns {o}"
            ));
            out.exec(&format!(
                "ip link set up{i} master br0 && ip link set up{i} up"
            ));
            site.host.exec(&format!(
                "ip addr add 198.51.100.{}/24 dev {UPLINK} && ip link set {UPLINK} up && ip route add default via {OUTSIDE} && ip route add {PERSONA_GATEWAY} dev {UPLINK}",
                1 + i
            ));
        }
        let mut vms = Vec::new();
        for site in &sites {
            etcd.join(site);
            let vm = Netns::new("p-vm");
            sh(&format!(
                "ip link add {VM_IFACE} netns {} type veth peer name eth0 netns {}",
                site.host.name, vm.name
            ));
            site.host.exec(&format!("ip link set {VM_IFACE} up"));
            vm.exec(VM_CONFIG);
            vms.push(vm);
        }
        if users {
            etcd.set_up_users(hosts);
        }
        let mut daemons: Vec<Daemon> = Vec::new();
        for (i, (site, host)) in sites.iter().zip(hosts).enumerate() {
            let admin = daemons.first().map(|d| d.admin.clone());
            let mut args = vec!["--host".to_owned(), host.to_string()];
            if users {
                let user = match i {
                    0 => "persona-admin".to_owned(),
                    _ => format!("persona-host-{host}"),
                };
                let password = etcd.password_file(&user);
                args.extend([
                    "--store-user".to_owned(),
                    user,
                    "--store-password-file".to_owned(),
                    password.display().to_string(),
                ]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            daemons.push(Daemon::start_in_fleet(
                site,
                &etcd.url(),
                admin.as_deref(),
                &args,
            ));
        }
        Self {
            daemons,
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            vms,
            sites,
            etcd,
        }
    }

    /// The manifest of the device of the VM behind host `i`, named `vm-HOST`.
    pub fn device(&self, i: usize, persona: &str) -> String {
        format!(
            "apiVersion: persona.dev/v1\nkind: Device\nmetadata: {{ name: vm-{h} }}\nspec:\n  host: {h}\n  interface: {VM_IFACE}\n  innerV4: 198.18.0.2\n  gatewayV4: 198.18.0.1\n  persona: {persona}\n",
            h = self.hosts[i]
        )
    }

    /// The address the outside saw a TCP connection from VM `i` come from.
    pub fn seen_from_outside(&self, i: usize) -> Option<String> {
        let out = self.vms[i].try_exec(&format!(
            "socat -T2 - TCP:{OUTSIDE}:8080,connect-timeout=2 </dev/null"
        ));
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !text.is_empty()).then_some(text)
    }

    /// Gives VM `vm` a second link, `eth1`, down, to host `host`'s [`VM_IFACE`] (which
    /// that host must not have a VM on).
    pub fn link(&self, vm: usize, host: usize) {
        let h = &self.sites[host].host;
        h.exec(&format!("ip link del {VM_IFACE}"));
        sh(&format!(
            "ip link add {VM_IFACE} netns {} type veth peer name eth1 netns {}",
            h.name, self.vms[vm].name
        ));
        h.exec(&format!("ip link set {VM_IFACE} up"));
    }

    /// What a live migration does to VM `vm` linked with [`FleetLab::link`]: its first
    /// link goes quiet and it carries on, as it was, on the second.
    pub fn move_over(&self, vm: usize) {
        self.vms[vm].exec("ip link set eth0 down && ip link set eth1 address 52:54:00:00:00:02 && ip addr add 198.18.0.2/24 dev eth1 && ip link set eth1 up && ip route add default via 198.18.0.1");
    }
}

/// Polls `ok` until it holds, for at most 30 s: a host reconnects to etcd at gRPC's
/// pace (a write in flight may wait out its 3 s deadline), not at once.
pub fn converges(what: &str, mut ok: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
