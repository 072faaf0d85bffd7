//! `persona migrate`: asks for a live migration, its cut-over or its end, and follows it.
use hyper::Method;
use serde_json::json;

use crate::client::Client;

pub(super) enum Ask<'a> {
    Move {
        to: &'a str,
        interface: Option<&'a str>,
        manual: bool,
    },
    CutOver,
    Cancel,
}

/// Asks, then follows the migration to its end.
pub(super) async fn migrate(
    client: &Client,
    device: &str,
    ask: Ask<'_>,
    no_wait: bool,
) -> anyhow::Result<()> {
    let cancel = matches!(ask, Ask::Cancel);
    let mut m = match ask {
        Ask::Move {
            to,
            interface,
            manual,
        } => {
            let mut body =
                json!({ "to": to, "cutover": if manual { "manual" } else { "first-frame" } });
            if let Some(i) = interface {
                body["interface"] = json!(i);
            }
            let path = format!("/devices/{device}/migrate");
            client.ok(Method::POST, &path, Some(&body)).await?
        }
        Ask::CutOver => {
            let path = format!("/devices/{device}/cutover");
            client.ok(Method::POST, &path, Some(&json!({}))).await?
        }
        Ask::Cancel => {
            let path = format!("/devices/{device}/migration");
            client.ok(Method::DELETE, &path, None).await?
        }
    };
    let id = m["id"].clone();
    println!(
        "{device}: migrating from {} to {} ({})",
        m["from"], m["to"], m["phase"]
    );
    if no_wait {
        return Ok(());
    }
    let ended = |m: &serde_json::Value| {
        m["id"] == id
            && ["done", "failed", "cancelled"].contains(&m["phase"].as_str().unwrap_or(""))
    };
    let mut said = m["phase"].clone();
    while !ended(&m) {
        if m["phase"] != said {
            println!("{device}: {}", m["phase"]);
            said = m["phase"].clone();
            if m["phase"] == "ready" && m["cutover"] == "manual" {
                println!(
                    "{device}: the target waits; cut over with `persona migrate {device} --cutover`"
                );
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        m = client
            .ok(Method::GET, &format!("/devices/{device}/migration"), None)
            .await?;
    }
    match m["phase"].as_str() {
        Some("done") if cancel => anyhow::bail!(
            "{device}: cut over to {} before the target saw it called off",
            m["to"]
        ),
        Some("done") => {
            println!(
                "{device}: runs on {} (interface {}), cut over {} ms after the target was ready",
                m["to"], m["interface"], m["waitedMs"]
            );
            Ok(())
        }
        Some("cancelled") => {
            println!(
                "{device}: migration called off by {}; runs on {}",
                m["cancelledBy"], m["from"]
            );
            if cancel {
                Ok(())
            } else {
                anyhow::bail!("{device}: the migration was called off")
            }
        }
        _ => anyhow::bail!("{device}: migration failed: {}", m["error"]),
    }
}
