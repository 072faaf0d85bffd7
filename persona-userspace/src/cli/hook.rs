//! `persona hook libvirt`: libvirt's QEMU hook (`/etc/libvirt/hooks/qemu.d/persona`),
//! called as `DOMAIN OPERATION SUBOP EXTRA` with the domain's XML on standard input.
//! libvirt waits for a hook before it goes on, so the hook holds a starting domain
//! until the persona daemon guards each of its interfaces that is a device: at
//! `prepare`, those whose tap is there already (made by persona); at `start`, when
//! libvirt has made its own taps but not yet started QEMU, all of them. A device that
//! is not guarded in time fails the start: no network rather than an unguarded one.
//! It talks only to the daemon, never to libvirt, which would deadlock.
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hyper::Method;
use serde_json::Value;

use crate::client::Client;

/// A network interface of a domain, as its XML describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInterface {
    /// The guest's MAC.
    pub mac: Option<String>,
    /// The host's side: a tap, named by the domain (`managed='no'`) or by libvirt.
    pub target: Option<String>,
}

pub fn interfaces(xml: &str) -> anyhow::Result<Vec<DomainInterface>> {
    let doc = roxmltree::Document::parse(xml).context("the domain XML on standard input")?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        bail!(
            "the XML on standard input is a <{}>, not a <domain>",
            root.tag_name().name()
        );
    }
    let attr = |iface: roxmltree::Node, tag: &str, name: &str| {
        iface
            .children()
            .find(|c| c.has_tag_name(tag))
            .and_then(|c| c.attribute(name))
            .map(str::to_owned)
    };
    Ok(root
        .children()
        .filter(|c| c.has_tag_name("devices"))
        .flat_map(|d| d.children().filter(|c| c.has_tag_name("interface")))
        .map(|i| DomainInterface {
            mac: attr(i, "mac", "address").map(|m| m.to_ascii_lowercase()),
            target: attr(i, "target", "dev"),
        })
        .collect())
}

/// The devices a domain's interfaces are, by interface name or by the guest's MAC.
fn devices_of(domain: &[DomainInterface], devices: &[Value]) -> Vec<(String, DomainInterface)> {
    let mut out = Vec::new();
    for i in domain {
        let found = devices.iter().find(|d| {
            let spec = &d["spec"];
            let by_name = i.target.is_some() && spec["interface"].as_str() == i.target.as_deref();
            let by_mac =
                i.mac.is_some() && spec["mac"].as_str().map(str::to_ascii_lowercase) == i.mac;
            by_name || by_mac
        });
        if let Some(d) = found
            && let Some(name) = d["metadata"]["name"].as_str()
        {
            out.push((name.to_owned(), i.clone()));
        }
    }
    out
}

/// Whether libvirt's tap for the interface exists at this point of the start.
fn tap_exists(i: &DomainInterface) -> bool {
    i.target
        .as_deref()
        .is_some_and(|t| crate::datapath::ifindex(t).is_ok())
}

fn guarded(status: &Value) -> bool {
    status["up"] == true && status["generation"].is_u64()
}

pub async fn libvirt(
    client: &Client,
    domain: &str,
    operation: &str,
    subop: &str,
    xml: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let wait_for_all = match (operation, subop) {
        ("prepare", "begin") => false,
        ("start", "begin") | ("started", "begin") => true,
        _ => return Ok(()),
    };
    let ours = interfaces(xml)?;
    if ours.is_empty() {
        return Ok(());
    }
    let devices = client
        .ok(Method::GET, "/devices", None)
        .await
        .with_context(|| {
            format!(
                "domain {domain}: asking the persona daemon which of its interfaces are \
                 devices; not starting it unguarded (without persona on this host, remove \
                 /etc/libvirt/hooks/qemu.d/persona)"
            )
        })?;
    let devices = devices["items"].as_array().cloned().unwrap_or_default();
    let wanted: Vec<String> = devices_of(&ours, &devices)
        .into_iter()
        .filter(|(_, i)| wait_for_all || tap_exists(i))
        .map(|(name, _)| name)
        .collect();
    let deadline = Instant::now() + timeout;
    for device in &wanted {
        loop {
            let status = client
                .ok(Method::GET, &format!("/status/{device}"), None)
                .await?;
            if guarded(&status) {
                break;
            }
            if Instant::now() >= deadline {
                let why = status["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                bail!(
                    "domain {domain}: device {device} on {} is not guarded after {}s{why}; \
                     not starting it unguarded",
                    status["interface"].as_str().unwrap_or("?"),
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PREMADE: &str = include_str!("../../../tests/fixtures/libvirt/premade/start-begin.xml");
    const MANAGED: &str = include_str!("../../../tests/fixtures/libvirt/managed/start-begin.xml");
    const MANAGED_PREPARE: &str =
        include_str!("../../../tests/fixtures/libvirt/managed/prepare-begin.xml");

    #[test]
    fn interfaces_are_read_from_what_libvirt_sends() {
        assert_eq!(
            interfaces(PREMADE).unwrap(),
            [DomainInterface {
                mac: Some("52:54:00:12:34:56".into()),
                target: Some("pt-lv1".into()),
            }]
        );
        assert_eq!(
            interfaces(MANAGED).unwrap()[0].target.as_deref(),
            Some("vnet0")
        );
        // Before libvirt makes its tap, the domain names none.
        assert_eq!(interfaces(MANAGED_PREPARE).unwrap()[0].target, None);
        let e = interfaces("<network/>").unwrap_err().to_string();
        assert!(e.contains("not a <domain>"), "{e}");
        assert!(interfaces("<domain").is_err());
    }

    #[test]
    fn devices_are_matched_by_tap_name_or_guest_mac() {
        let devices = [
            serde_json::json!({"metadata": {"name": "a"}, "spec": {"interface": "pt-lv1"}}),
            serde_json::json!({"metadata": {"name": "b"}, "spec": {"interface": "x", "mac": "52:54:00:AB:CD:EF"}}),
        ];
        let premade = devices_of(&interfaces(PREMADE).unwrap(), &devices);
        assert_eq!(premade[0].0, "a");
        let managed = devices_of(&interfaces(MANAGED).unwrap(), &devices);
        assert_eq!(managed[0].0, "b");
        assert!(devices_of(&interfaces(PREMADE).unwrap(), &devices[1..]).is_empty());
    }
}
