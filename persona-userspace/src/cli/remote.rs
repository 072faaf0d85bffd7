//! Commands that go through the daemon's API.
use std::time::Duration;

use anyhow::{Context as _, bail};
use hyper::Method;
use serde_json::{Value, json};

use super::{Cli, Command, Format, HookCommand, KindArg, TokenCommand};
use crate::{
    client::Client,
    daemon::admin_token_path,
    model::{Manifest, load_manifests},
};

fn token(cli: &Cli) -> Option<String> {
    cli.token.clone().or_else(|| {
        std::fs::read_to_string(admin_token_path(&cli.data_dir))
            .ok()
            .map(|t| t.trim().to_owned())
    })
}

impl KindArg {
    fn path(self) -> &'static str {
        match self {
            KindArg::Personas => "/personas",
            KindArg::Devices => "/devices",
            KindArg::Rules => "/rules",
            KindArg::Applications => "/applications",
        }
    }
    fn singular(self) -> &'static str {
        match self {
            KindArg::Personas => "persona",
            KindArg::Devices => "device",
            KindArg::Rules => "rule",
            KindArg::Applications => "application",
        }
    }
}

fn print(format: Format, value: &Value) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Yaml | Format::Table => print!("{}", serde_yaml::to_string(value)?),
    }
    Ok(())
}

fn list(v: &Value, key: &str) -> String {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn table(kind: KindArg, items: &[Value]) {
    match kind {
        KindArg::Personas => {
            println!(
                "{:<20} {:<40} {:<20} {:>7}",
                "NAME", "ADDRESSES", "DNS", "VERSION"
            );
            for i in items {
                let s = &i["spec"];
                let pools = s["addressPool"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(|p| format!("pool {p}")));
                let addresses = [list(s, "addresses")]
                    .into_iter()
                    .filter(|a| !a.is_empty())
                    .chain(pools)
                    .collect::<Vec<_>>()
                    .join(",");
                println!(
                    "{:<20} {:<40} {:<20} {:>7}",
                    i["metadata"]["name"].as_str().unwrap_or(""),
                    addresses,
                    list(s, "dns"),
                    i["metadata"]["version"]
                );
            }
        }
        KindArg::Applications => {
            println!("{:<20} {:<8} {:<24} CIDRS", "NAME", "PROTO", "PORTS");
            for i in items {
                let s = &i["spec"];
                println!(
                    "{:<20} {:<8} {:<24} {}",
                    i["metadata"]["name"].as_str().unwrap_or(""),
                    s["protocol"].as_str().unwrap_or("any"),
                    list(s, "ports"),
                    list(s, "cidrs")
                );
            }
        }
        KindArg::Rules => {
            println!(
                "{:<20} {:>8} {:<16} {:<24} WHEN",
                "NAME", "PRIORITY", "PERSONA", "SELECTOR"
            );
            for i in items {
                let s = &i["spec"];
                let selector = s["selector"]["matchLabels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                let when: Vec<String> = s["when"]
                    .as_object()
                    .map(|m| m.keys().cloned().collect())
                    .unwrap_or_default();
                println!(
                    "{:<20} {:>8} {:<16} {:<24} {}",
                    i["metadata"]["name"].as_str().unwrap_or(""),
                    s["priority"],
                    s["persona"].as_str().unwrap_or(""),
                    if selector.is_empty() {
                        "(all)".to_owned()
                    } else {
                        selector
                    },
                    when.join(",")
                );
            }
        }
        KindArg::Devices => {
            println!(
                "{:<20} {:<12} {:<30} {:<16} {:>7}",
                "NAME", "INTERFACE", "INNER", "PERSONA", "VERSION"
            );
            for i in items {
                let s = &i["spec"];
                let inner: Vec<&str> = [s["innerV4"].as_str(), s["innerV6"].as_str()]
                    .into_iter()
                    .flatten()
                    .collect();
                println!(
                    "{:<20} {:<12} {:<30} {:<16} {:>7}",
                    i["metadata"]["name"].as_str().unwrap_or(""),
                    s["interface"].as_str().unwrap_or(""),
                    inner.join(","),
                    s["persona"].as_str().unwrap_or("-"),
                    i["metadata"]["version"]
                );
            }
        }
    }
}

async fn apply(client: &Client, path: &std::path::Path, dry_run: bool) -> anyhow::Result<()> {
    // Every document is checked before anything is sent: a bad file changes nothing.
    let mut manifests = load_manifests(path)?;
    // Personas before the devices and rules that name them.
    manifests.sort_by_key(|m| match m {
        Manifest::Persona { .. } => 0,
        Manifest::Device { .. } => 1,
        Manifest::Rule { .. } | Manifest::Application { .. } => 2,
    });
    for m in manifests {
        let (kind, spec) = match &m {
            Manifest::Persona { spec, .. } => (KindArg::Personas, serde_json::to_value(spec)?),
            Manifest::Device { spec, .. } => (KindArg::Devices, serde_json::to_value(spec)?),
            Manifest::Rule { spec, .. } => (KindArg::Rules, serde_json::to_value(spec)?),
            Manifest::Application { spec, .. } => {
                (KindArg::Applications, serde_json::to_value(spec)?)
            }
        };
        let name = m.name().to_owned();
        let label = format!("{}/{name}", kind.singular());
        let (status, current) = client
            .call(Method::GET, &format!("{}/{name}", kind.path()), None)
            .await?;
        let body = json!({ "metadata": { "name": name }, "spec": spec });
        if status == hyper::StatusCode::NOT_FOUND {
            if dry_run {
                println!("{label} would be created");
            } else {
                client
                    .ok(Method::POST, kind.path(), Some(&body))
                    .await
                    .with_context(|| label.clone())?;
                println!("{label} created");
            }
        } else if !status.is_success() {
            bail!(
                "{label}: {} (HTTP {status})",
                current["error"].as_str().unwrap_or("request failed")
            );
        } else if current["spec"] == spec {
            println!("{label} unchanged");
        } else if dry_run {
            println!("{label} would be configured");
        } else {
            client
                .ok(Method::PUT, &format!("{}/{name}", kind.path()), Some(&body))
                .await
                .with_context(|| label.clone())?;
            println!("{label} configured");
        }
    }
    Ok(())
}

fn print_plan(outcome: &Value) {
    let plan = &outcome["plan"];
    println!(
        "{}: {} -> {}",
        plan["device"].as_str().unwrap_or("?"),
        plan["from"].as_str().unwrap_or("(none)"),
        plan["to"].as_str().unwrap_or("?")
    );
    for step in plan["steps"].as_array().into_iter().flatten() {
        let mut s = step.clone();
        let name = s.as_object_mut().and_then(|o| o.remove("step"));
        println!(
            "  step {}: {}",
            name.as_ref().and_then(Value::as_str).unwrap_or("?"),
            s
        );
    }
    for line in plan["diff"].as_array().into_iter().flatten() {
        println!("  {}", line.as_str().unwrap_or(""));
    }
}

fn event_line(e: &Value) -> String {
    let opt = |k: &str| e[k].as_str().map(str::to_owned);
    let change = match (opt("from"), opt("to")) {
        (Some(f), Some(t)) => format!("{f} -> {t}"),
        (None, Some(t)) => t,
        (Some(f), None) => format!("from {f}"),
        _ => String::new(),
    };
    format!(
        "{:>5} {} {:<6} {:<22} {:<8} {:<28} {}{}",
        e["seq"],
        e["at"].as_str().unwrap_or(""),
        opt("kind").unwrap_or_default(),
        opt("actor").unwrap_or_default(),
        opt("device").unwrap_or_else(|| "-".into()),
        change,
        opt("result").unwrap_or_default(),
        e["generation"]
            .as_u64()
            .map(|g| format!(" (generation {g})"))
            .unwrap_or_default()
    )
}

/// Totals per device: persona, generation, and packets/bytes passed and dropped per
/// direction (egress pass, egress drop, ingress pass, ingress drop).
type Totals = std::collections::BTreeMap<String, (String, String, [u64; 8])>;

async fn totals(client: &Client) -> anyhow::Result<Totals> {
    let mut out = Totals::new();
    let devices = client.ok(Method::GET, "/devices", None).await?;
    for d in devices["items"].as_array().into_iter().flatten() {
        let Some(name) = d["metadata"]["name"].as_str() else {
            continue;
        };
        let s = client
            .ok(Method::GET, &format!("/status/{name}"), None)
            .await?;
        let mut sums = [0u64; 8];
        for r in s["counters"].as_array().into_iter().flatten() {
            let egress = r["direction"] == "egress";
            let pass = r["reason"]
                .as_str()
                .is_some_and(|x| x.starts_with("allow") || x.starts_with("pass"));
            let base = match (egress, pass) {
                (true, true) => 0,
                (true, false) => 2,
                (false, true) => 4,
                (false, false) => 6,
            };
            sums[base] += r["packets"].as_u64().unwrap_or(0);
            sums[base + 1] += r["bytes"].as_u64().unwrap_or(0);
        }
        let persona = s["persona"].as_str().unwrap_or("-").to_owned();
        out.insert(
            name.to_owned(),
            (persona, s["generation"].to_string(), sums),
        );
    }
    Ok(out)
}

fn human(bytes_per_s: f64) -> String {
    let bits = bytes_per_s * 8.0;
    match bits {
        b if b >= 1e9 => format!("{:.1}Gb/s", b / 1e9),
        b if b >= 1e6 => format!("{:.1}Mb/s", b / 1e6),
        b if b >= 1e3 => format!("{:.1}kb/s", b / 1e3),
        b => format!("{b:.0}b/s"),
    }
}

/// A screen of per-device rates, redrawn every `interval` seconds.
async fn top(client: &Client, interval: f64, iterations: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let interval = Duration::from_secs_f64(interval.max(0.2));
    let mut previous = totals(client).await?;
    let mut at = std::time::Instant::now();
    let mut n = 0;
    loop {
        tokio::time::sleep(interval).await;
        let now = totals(client).await?;
        let secs = at.elapsed().as_secs_f64();
        at = std::time::Instant::now();
        // Clear the screen and go home, as top does.
        print!("\x1b[2J\x1b[H");
        println!(
            "persona top - every {:.1}s, {} devices",
            interval.as_secs_f64(),
            now.len()
        );
        println!(
            "{:<14} {:<12} {:>5} {:>10} {:>11} {:>10} {:>10} {:>11} {:>10}",
            "DEVICE",
            "PERSONA",
            "GEN",
            "OUT pkt/s",
            "OUT rate",
            "OUT drop/s",
            "IN pkt/s",
            "IN rate",
            "IN drop/s"
        );
        for (name, (persona, generation, sums)) in &now {
            let old = previous.get(name).map_or([0; 8], |p| p.2);
            let rate = |i: usize| sums[i].saturating_sub(old[i]) as f64 / secs;
            println!(
                "{:<14} {:<12} {:>5} {:>10.1} {:>11} {:>10.1} {:>10.1} {:>11} {:>10.1}",
                name,
                persona,
                generation,
                rate(0),
                human(rate(1)),
                rate(2),
                rate(4),
                human(rate(5)),
                rate(6)
            );
        }
        std::io::stdout().flush()?;
        previous = now;
        n += 1;
        if iterations != 0 && n >= iterations {
            return Ok(());
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one parameter per command-line flag"
)]
fn context_signals(
    device: &str,
    alert: &[String],
    clear: &[String],
    country: &Option<String>,
    app: &[String],
    app_stopped: &[String],
    role: &Option<String>,
    ttl: Option<u64>,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for a in alert {
        let mut parts = a.splitn(3, ':');
        let (id, severity, kind) = (
            parts.next().unwrap_or(""),
            parts.next(),
            parts.next().unwrap_or(""),
        );
        let Some(severity) = severity else {
            bail!("--alert {a:?}: expected ID:SEVERITY[:KIND]");
        };
        out.push(json!({"kind": "alert", "id": id, "severity": severity, "alertKind": kind}));
    }
    for id in clear {
        // The severity of a cleared alert does not matter; low is the least claim.
        out.push(json!({"kind": "alert", "id": id, "severity": "low", "state": "cleared"}));
    }
    if let Some(c) = country {
        out.push(json!({"kind": "geo", "country": c}));
    }
    for a in app {
        out.push(json!({"kind": "app", "app": a, "active": true}));
    }
    for a in app_stopped {
        out.push(json!({"kind": "app", "app": a, "active": false}));
    }
    if let Some(r) = role {
        out.push(json!({"kind": "role", "role": r}));
    }
    for s in &mut out {
        s["device"] = json!(device);
        s["source"] = json!("cli");
        if let Some(t) = ttl {
            s["ttl"] = json!(t);
        }
    }
    Ok(out)
}

/// Whether a token may go to `target` in the clear: only over the Unix socket, or to
/// this host itself.
fn safe_in_the_clear(target: &crate::client::Target) -> bool {
    use crate::client::Target;
    match target {
        Target::Unix(_) | Target::Https(_) => true,
        Target::Tcp(authority) => {
            let host = authority
                .rsplit_once(':')
                .map_or(authority.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']');
            host.eq_ignore_ascii_case("localhost")
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        }
    }
}

pub(super) async fn run(cli: &Cli) -> anyhow::Result<()> {
    let token = token(cli);
    if token.is_some() && !safe_in_the_clear(&cli.server) {
        bail!(
            "refusing to send a token over plain HTTP to another host; use https:// (with --cacert) or the Unix socket"
        );
    }
    let client = Client {
        target: cli.server.clone(),
        token,
        cacert: cli.cacert.clone(),
    };
    match &cli.command {
        Command::Apply { manifests, dry_run } => apply(&client, manifests, *dry_run).await?,
        Command::Hook {
            command:
                HookCommand::Libvirt {
                    domain,
                    operation,
                    subop,
                    extra: _,
                    timeout_secs,
                },
        } => {
            let mut xml = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut xml)
                .context("reading the domain XML")?;
            super::hook::libvirt(
                &client,
                domain,
                operation,
                subop,
                &xml,
                std::time::Duration::from_secs(*timeout_secs),
            )
            .await?
        }
        Command::Get { kind, name, output } => {
            let path = match name {
                Some(n) => format!("{}/{n}", kind.path()),
                None => kind.path().to_owned(),
            };
            let v = client.ok(Method::GET, &path, None).await?;
            match (output, name) {
                (Format::Table, Some(_)) => table(*kind, std::slice::from_ref(&v)),
                (Format::Table, None) => {
                    table(*kind, v["items"].as_array().map_or(&[], |a| a.as_slice()))
                }
                (f, _) => print(*f, &v)?,
            }
        }
        Command::Delete { kind, name, force } => {
            client
                .ok(
                    Method::DELETE,
                    &format!("{}/{name}?force={force}", kind.path()),
                    None,
                )
                .await?;
            println!("{}/{name} deleted", kind.singular());
        }
        Command::Shift {
            device,
            persona,
            dry_run,
            flows,
        } => {
            let mut body =
                json!({ "device_id": device, "persona_id": persona, "dry_run": dry_run });
            if let Some(f) = flows {
                body["flows"] = json!(f);
            }
            let outcome = client
                .ok(Method::POST, "/trigger_shift", Some(&body))
                .await?;
            if *dry_run {
                println!("dry run, nothing changed:");
                print_plan(&outcome);
            } else {
                println!(
                    "{device}: {persona} (generation {}, {:.1} ms)",
                    outcome["generation"],
                    outcome["duration_us"].as_f64().unwrap_or(0.0) / 1000.0
                );
            }
        }
        Command::Migrate {
            device,
            to,
            interface,
            manual,
            cutover,
            cancel,
            no_wait,
        } => {
            use super::migrate::Ask;
            let ask = match (to, cutover, cancel) {
                (_, true, _) => Ask::CutOver,
                (_, _, true) => Ask::Cancel,
                (Some(to), ..) => Ask::Move {
                    to,
                    interface: interface.as_deref(),
                    manual: *manual,
                },
                (None, ..) => anyhow::bail!("--to: which host to move {device} to"),
            };
            super::migrate::migrate(&client, device, ask, *no_wait).await?
        }
        Command::Status { device, output } => {
            let names: Vec<String> = match device {
                Some(d) => vec![d.clone()],
                None => client.ok(Method::GET, "/devices", None).await?["items"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_owned))
                    .collect(),
            };
            for name in names {
                let s = client
                    .ok(Method::GET, &format!("/status/{name}"), None)
                    .await?;
                if *output != Format::Table {
                    print(*output, &s)?;
                    continue;
                }
                let gone = match (&s["up"], s["host"].as_str()) {
                    (Value::Bool(false), _) => " (interface gone)".to_owned(),
                    (Value::Null, Some(host)) => format!(" of host {host}"),
                    _ => String::new(),
                };
                println!(
                    "{name}: {} on {}{gone}, generation {}, since {}",
                    s["persona"].as_str().unwrap_or("(no persona)"),
                    s["interface"].as_str().unwrap_or("?"),
                    s["generation"],
                    s["since"].as_str().unwrap_or("-")
                );
                if let Some(why) = s["error"].as_str() {
                    println!("  failing: {why}");
                }
                for l in s["leases"].as_array().into_iter().flatten() {
                    println!("  leased {}", l.as_str().unwrap_or("?"));
                }
                println!("  flows: {}", s["flows"]);
                for d in s["draining"].as_array().into_iter().flatten() {
                    println!(
                        "  draining {} of {}: {} flows",
                        d["address"].as_str().unwrap_or("?"),
                        d["persona"].as_str().unwrap_or("?"),
                        d["flows"]
                    );
                }
                if device.is_some() {
                    println!(
                        "  {:<9} {:<22} {:>12} {:>14}",
                        "DIRECTION", "REASON", "PACKETS", "BYTES"
                    );
                    for r in s["counters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|r| r["packets"].as_u64() > Some(0))
                    {
                        println!(
                            "  {:<9} {:<22} {:>12} {:>14}",
                            r["direction"].as_str().unwrap_or(""),
                            r["reason"].as_str().unwrap_or(""),
                            r["packets"].as_u64().unwrap_or(0),
                            r["bytes"].as_u64().unwrap_or(0)
                        );
                    }
                }
            }
        }
        Command::Events { follow, output } => {
            let mut after = 0u64;
            // The history first, at once; then, when following, long polls for what comes.
            let mut wait = 0;
            loop {
                let v = client
                    .ok(
                        Method::GET,
                        &format!("/events?after={after}&limit=500&wait={wait}"),
                        None,
                    )
                    .await?;
                for e in v["items"].as_array().into_iter().flatten() {
                    after = after.max(e["seq"].as_u64().unwrap_or(after));
                    match output {
                        Format::Table => println!("{}", event_line(e)),
                        Format::Json => println!("{e}"),
                        Format::Yaml => print!("---\n{}", serde_yaml::to_string(e)?),
                    }
                }
                if !*follow {
                    break;
                }
                wait = 30;
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Create { role, description } => {
                let v = client
                    .ok(
                        Method::POST,
                        "/tokens",
                        Some(&json!({ "role": role, "description": description })),
                    )
                    .await?;
                eprintln!(
                    "token {} ({}) created; it is shown only now:",
                    v["id"].as_str().unwrap_or("?"),
                    role
                );
                println!("{}", v["token"].as_str().unwrap_or(""));
            }
            TokenCommand::List => {
                let v = client.ok(Method::GET, "/tokens", None).await?;
                println!(
                    "{:<10} {:<9} {:<8} {:<28} DESCRIPTION",
                    "ID", "ROLE", "REVOKED", "CREATED"
                );
                for t in v["items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<10} {:<9} {:<8} {:<28} {}",
                        t["id"].as_str().unwrap_or(""),
                        t["role"].as_str().unwrap_or(""),
                        t["revoked"],
                        t["created"].as_str().unwrap_or(""),
                        t["description"].as_str().unwrap_or("")
                    );
                }
            }
            TokenCommand::Revoke { id } => {
                client
                    .ok(Method::DELETE, &format!("/tokens/{id}"), None)
                    .await?;
                println!("token {id} revoked");
            }
        },
        Command::Context {
            device,
            alert,
            clear,
            country,
            app,
            app_stopped,
            role,
            ttl,
            feed,
        } => {
            let batch = match (feed, device) {
                (Some(path), _) => {
                    let text = if path.as_os_str() == "-" {
                        std::io::read_to_string(std::io::stdin())?
                    } else {
                        std::fs::read_to_string(path)
                            .with_context(|| format!("reading {}", path.display()))?
                    };
                    let mut signals = Vec::new();
                    for (n, line) in text
                        .lines()
                        .enumerate()
                        .filter(|(_, l)| !l.trim().is_empty())
                    {
                        signals.push(
                            serde_json::from_str::<Value>(line)
                                .with_context(|| format!("line {}", n + 1))?,
                        );
                    }
                    signals
                }
                (None, Some(d)) => {
                    context_signals(d, alert, clear, country, app, app_stopped, role, *ttl)?
                }
                (None, None) => bail!("give a DEVICE with signal flags, or --feed FILE"),
            };
            if batch.is_empty() {
                bail!("no signals given");
            }
            let mut accepted = 0;
            for chunk in batch.chunks(500) {
                let v = client
                    .ok(
                        Method::POST,
                        "/context",
                        Some(&Value::Array(chunk.to_vec())),
                    )
                    .await?;
                accepted += v["accepted"].as_u64().unwrap_or(0);
                for d in v["devices"].as_array().into_iter().flatten() {
                    let dec = &d["decision"];
                    let done = match &d["outcome"] {
                        Value::Null => String::new(),
                        o => format!(" -> {o}"),
                    };
                    println!(
                        "{}: {}{}",
                        d["device"].as_str().unwrap_or("?"),
                        dec["why"].as_str().unwrap_or(""),
                        done
                    );
                }
            }
            eprintln!("{accepted} signals accepted");
        }
        Command::Explain { device } => {
            let d = client
                .ok(Method::GET, &format!("/explain/{device}"), None)
                .await?;
            println!(
                "{device}: wants {} ({}){}",
                d["desired"].as_str().unwrap_or("nothing"),
                d["why"].as_str().unwrap_or(""),
                if d["shift"] == true { ", shifting" } else { "" }
            );
            for r in d["rules"].as_array().into_iter().flatten() {
                let verdict = if r["matched"] == true {
                    "MATCH"
                } else if r["selected"] == true {
                    "no"
                } else {
                    "-"
                };
                println!(
                    "  {:<5} {:<20} prio {:>4} -> {}",
                    verdict,
                    r["rule"].as_str().unwrap_or(""),
                    r["priority"],
                    r["persona"].as_str().unwrap_or("")
                );
                for reason in r["reasons"].as_array().into_iter().flatten() {
                    println!("          {}", reason.as_str().unwrap_or(""));
                }
            }
        }
        Command::Top {
            interval,
            iterations,
        } => top(&client, *interval, *iterations).await?,
        other => bail!("{other:?} does not go through the daemon"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::safe_in_the_clear;

    #[test]
    fn tokens_go_in_the_clear_only_to_this_host() {
        for (server, safe) in [
            ("unix:/run/persona/persona.sock", true),
            ("https://persona.example:7443", true),
            ("http://127.0.0.1:7443", true),
            ("http://[::1]:7443", true),
            ("http://localhost:7443", true),
            ("http://192.0.2.10:7443", false),
            ("http://[2001:db8::1]:7443", false),
            ("http://persona.example:7443", false),
        ] {
            assert_eq!(
                safe_in_the_clear(&server.parse().unwrap()),
                safe,
                "{server}"
            );
        }
    }
}
