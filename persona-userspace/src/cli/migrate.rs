//! `persona migrate`: asks for a live migration and follows it.
use hyper::Method;
use serde_json::json;

use crate::client::Client;

/// Asks for the migration (or its cut-over) and follows it to its end.
pub(super) async fn migrate(
    client: &Client,
    device: &str,
    to: Option<&str>,
    interface: Option<&str>,
    manual: bool,
    cutover: bool,
    no_wait: bool,
) -> anyhow::Result<()> {
    let mut m = if cutover {
        client
            .ok(
                Method::POST,
                &format!("/devices/{device}/cutover"),
                Some(&json!({})),
            )
            .await?
    } else {
        let mut body =
            json!({ "to": to, "cutover": if manual { "manual" } else { "first-frame" } });
        if let Some(i) = interface {
            body["interface"] = json!(i);
        }
        client
            .ok(
                Method::POST,
                &format!("/devices/{device}/migrate"),
                Some(&body),
            )
            .await?
    };
    let id = m["id"].clone();
    println!(
        "{device}: migrating from {} to {} ({})",
        m["from"], m["to"], m["phase"]
    );
    if no_wait {
        return Ok(());
    }
    let mut said = m["phase"].clone();
    loop {
        if m["id"] == id && (m["phase"] == "done" || m["phase"] == "failed") {
            break;
        }
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
        Some("done") => {
            println!(
                "{device}: runs on {} (interface {}), cut over {} ms after the target was ready",
                m["to"], m["interface"], m["waitedMs"]
            );
            Ok(())
        }
        _ => anyhow::bail!("{device}: migration failed: {}", m["error"]),
    }
}
