//! The REST API against the real daemon: every endpoint for every kind of caller,
//! version conflicts, errors, the OpenAPI document, a crash during writes, and the CLI.
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use hyper::Method;
use persona_tests::{
    daemon::Daemon,
    lab::{Lab, VmLink, wait_until},
};
use serde_json::{Value, json};

fn persona_body(name: &str, addr: &str) -> Value {
    json!({ "metadata": { "name": name }, "spec": { "addresses": [addr] } })
}

fn setup() -> (Lab, Daemon) {
    let lab = Lab::new(VmLink::Veth);
    let daemon = Daemon::start(&lab);
    daemon.cli_ok("apply -f examples/");
    (lab, daemon)
}

fn token(d: &Daemon, role: &str) -> (String, String) {
    let (status, v) = d.admin(Method::POST, "/tokens", Some(&json!({ "role": role })));
    assert_eq!(status, 201, "{v}");
    (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn every_endpoint_for_every_caller() {
    let (_lab, d) = setup();
    let viewer = token(&d, "viewer").1;
    let operator = token(&d, "operator").1;
    let (revoked_id, revoked) = token(&d, "admin");
    assert_eq!(
        d.admin(Method::DELETE, &format!("/tokens/{revoked_id}"), None)
            .0,
        204
    );
    let admin = d.admin.clone();
    let bad = format!("{}x", &admin[..admin.len() - 1]);

    let callers: [(&str, Option<&str>, u8); 6] = [
        ("none", None, 0),
        ("bad", Some(&bad), 0),
        ("revoked", Some(&revoked), 0),
        ("viewer", Some(&viewer), 1),
        ("operator", Some(&operator), 2),
        ("admin", Some(&admin), 3),
    ];
    let office = d.admin(Method::GET, "/personas/office", None).1;
    let vm1 = d.admin(Method::GET, "/devices/vm1", None).1;
    for (who, tok, level) in callers {
        let unique = format!("p-{who}");
        // (method, path, body, role needed: 0 none, 1 viewer, 2 operator, 3 admin, status when allowed)
        let throwaway = if level == 3 {
            token(&d, "viewer").0
        } else {
            "nobody".into()
        };
        let cases: Vec<(Method, String, Option<Value>, u8, u16)> = vec![
            (Method::GET, "/healthz".into(), None, 0, 200),
            (Method::GET, "/openapi.json".into(), None, 1, 200),
            (Method::GET, "/personas".into(), None, 1, 200),
            (Method::GET, "/personas/office".into(), None, 1, 200),
            (
                Method::POST,
                "/personas".into(),
                Some(persona_body(&unique, "192.0.2.77/24")),
                3,
                201,
            ),
            (
                Method::PUT,
                "/personas/office".into(),
                Some(json!({"metadata": {"name": "office"}, "spec": office["spec"]})),
                3,
                200,
            ),
            (Method::DELETE, format!("/personas/{unique}"), None, 3, 204),
            (Method::GET, "/devices".into(), None, 1, 200),
            (Method::GET, "/devices/vm1".into(), None, 1, 200),
            (
                Method::POST,
                "/devices".into(),
                Some(
                    json!({"metadata": {"name": "ghost"}, "spec": {"interface": "up0", "innerV4": "198.18.0.9"}}),
                ),
                3,
                422,
            ),
            (
                Method::PUT,
                "/devices/vm1".into(),
                Some(json!({"metadata": {"name": "vm1"}, "spec": vm1["spec"]})),
                3,
                200,
            ),
            (Method::DELETE, "/devices/ghost".into(), None, 3, 404),
            (Method::GET, "/status/vm1".into(), None, 1, 200),
            (
                Method::POST,
                "/trigger_shift".into(),
                Some(json!({"device_id": "vm1", "persona_id": "travel", "dry_run": true})),
                2,
                200,
            ),
            (Method::GET, "/events".into(), None, 1, 200),
            (Method::GET, "/tokens".into(), None, 3, 200),
            (
                Method::POST,
                "/tokens".into(),
                Some(json!({"role": "viewer"})),
                3,
                201,
            ),
            (Method::DELETE, format!("/tokens/{throwaway}"), None, 3, 204),
            // Malformed input: who may not call the route hears so before anything
            // about the input; who may gets a JSON error naming what is wrong.
            (
                Method::POST,
                "/personas".into(),
                Some(json!({"metadata": {"name": "x"}, "spec": {"addresses": 5}})),
                3,
                422,
            ),
            (
                Method::POST,
                "/context".into(),
                Some(json!({"device": 5})),
                2,
                422,
            ),
            (
                Method::POST,
                "/trigger_shift".into(),
                Some(json!({})),
                2,
                422,
            ),
            (Method::GET, "/events?after=soon".into(), None, 1, 400),
        ];
        for (method, path, body, need, allowed) in cases {
            let (status, v) = d.call(tok, method.clone(), &path, body.as_ref());
            let want = if need == 0 {
                allowed
            } else if level == 0 {
                401
            } else if level < need {
                403
            } else {
                allowed
            };
            assert_eq!(status, want, "{who}: {method} {path} -> {v}");
            if status >= 400 {
                assert!(
                    v["error"].as_str().is_some_and(|e| !e.is_empty()),
                    "{who}: {method} {path}: JSON error expected, got {v}"
                );
            }
        }
    }
}

/// Status, content type and body of a raw request an admin makes over the socket.
fn raw(d: &Daemon, args: &[&str]) -> (u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--unix-socket"])
        .arg(&d.socket)
        .args(["-H", &format!("Authorization: Bearer {}", d.admin)])
        .args(["-w", "\n%{http_code} %{content_type}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = text.rsplit_once('\n').expect("curl's write-out");
    let (code, ctype) = tail.split_once(' ').unwrap_or((tail, ""));
    (code.parse().unwrap_or(0), ctype.to_owned(), body.to_owned())
}

#[test]
fn framework_rejections_are_json_errors_too() {
    let (_lab, d) = setup();
    for (args, want) in [
        (
            vec![
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "-d",
                "{",
                "http://persona/personas",
            ],
            400,
        ),
        (
            vec![
                "-X",
                "POST",
                "-H",
                "Content-Type: text/plain",
                "-d",
                "{}",
                "http://persona/personas",
            ],
            415,
        ),
        (vec!["http://persona/events?after=soon"], 400),
        (vec!["http://persona/events?wait=-3"], 400),
    ] {
        let (status, ctype, body) = raw(&d, &args);
        assert_eq!(status, want, "{args:?}: {body}");
        assert_eq!(ctype, "application/json", "{args:?}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{args:?}: {e}: {body}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
}

#[test]
fn versions_conflicts_and_bad_input() {
    let (_lab, d) = setup();
    let (s, v) = d.admin(
        Method::POST,
        "/personas",
        Some(&persona_body("home", "192.0.2.30/24")),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["metadata"]["version"], 1);
    let (s, _) = d.admin(
        Method::POST,
        "/personas",
        Some(&persona_body("home", "192.0.2.31/24")),
    );
    assert_eq!(s, 409, "creating twice");

    let update = |version: u64, addr: &str| json!({"metadata": {"name": "home", "version": version}, "spec": {"addresses": [addr]}});
    let (s, v) = d.admin(
        Method::PUT,
        "/personas/home",
        Some(&update(1, "192.0.2.32/24")),
    );
    assert_eq!(
        (s, v["metadata"]["version"].as_u64()),
        (200, Some(2)),
        "{v}"
    );
    let (s, v) = d.admin(
        Method::PUT,
        "/personas/home",
        Some(&update(1, "192.0.2.33/24")),
    );
    assert_eq!(s, 409, "a stale version is refused: {v}");
    assert!(
        v["error"].as_str().unwrap().contains("version 2, not 1"),
        "{v}"
    );
    let (_, v) = d.admin(Method::GET, "/personas/home", None);
    assert_eq!(
        v["spec"]["addresses"][0], "192.0.2.32/24",
        "the refused write changed nothing"
    );

    let (s, v) = d.admin(Method::POST, "/personas", Some(&json!({"metadata": {"name": "bad"}, "spec": {"addresses": ["203.0.113.40/24"], "firewall": {"ingress": {"default": "drop", "rules": [{"cidr": "198.51.100.0/24", "protocol": "tcp", "ports": 70000, "action": "allow"}]}}}})));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("70000 is not a port"),
        "{v}"
    );
    let (s, v) = d.admin(Method::POST, "/personas", Some(&json!({"metadata": {"name": "bad"}, "spec": {"addresses": ["203.0.113.40/24", "203.0.113.300/24"]}})));
    assert_eq!(
        (s, v["field"].as_str()),
        (422, Some("spec.addresses[1]")),
        "{v}"
    );
    let (s, v) = d.admin(
        Method::POST,
        "/trigger_shift",
        Some(&json!({"device_id": "vm1", "persona_id": "travel", "flows": "sideways"})),
    );
    assert_eq!((s, v["field"].as_str()), (422, Some("flows")), "{v}");
    for (query, field) in [
        ("limit=-1", "limit"),
        ("limit=1001", "limit"),
        ("wait=61", "wait"),
        ("after=9223372036854775808", "after"),
    ] {
        let (s, v) = d.admin(Method::GET, &format!("/events?{query}"), None);
        assert_eq!((s, v["field"].as_str()), (400, Some(field)), "{query}: {v}");
    }
    let (s, v) = d.admin(Method::POST, "/personas", Some(&json!({"metadata": {"name": "bad"}, "spec": {"addresses": ["203.0.113.40/24"], "gateway": "192.0.2.1"}})));
    assert_eq!((s, v["field"].as_str()), (422, Some("spec.gateway")), "{v}");
    let (s, _) = d.admin(Method::GET, "/personas/bad", None);
    assert_eq!(s, 404, "bad input stored nothing");

    // An address belongs to one persona: a clash names the persona that has it.
    let create = |name: &str, spec: Value| {
        d.admin(
            Method::POST,
            "/personas",
            Some(&json!({"metadata": {"name": name}, "spec": spec})),
        )
    };
    for (spec, field, why) in [
        (
            json!({"addresses": ["203.0.113.10/24"]}),
            "spec.addresses",
            "Persona \"office\": 203.0.113.10 is its address too",
        ),
        (
            json!({"addresses": ["203.0.113.70/24"]}),
            "spec.addresses",
            "Persona \"hardened\": 203.0.113.70 is in its pool 203.0.113.64/28",
        ),
        (
            json!({"addressPool": ["203.0.113.72/29"]}),
            "spec.addressPool",
            "Persona \"hardened\": pool 203.0.113.72/29 overlaps its pool 203.0.113.64/28",
        ),
        (
            json!({"addressPool": ["192.0.2.32/30"]}),
            "spec.addressPool",
            "Persona \"home\": pool 192.0.2.32/30 holds its address 192.0.2.32",
        ),
    ] {
        let (s, v) = create("clash", spec);
        assert_eq!((s, v["field"].as_str()), (422, Some(field)), "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{why}: {v}");
    }
    assert_eq!(d.admin(Method::GET, "/personas/clash", None).0, 404);
    // Once home has another, its old address is free.
    let (s, v) = d.admin(
        Method::PUT,
        "/personas/home",
        Some(&update(2, "192.0.2.34/24")),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = create("after-home", json!({"addresses": ["192.0.2.32/24"]}));
    assert_eq!(s, 201, "{v}");

    let (s, v) = d.admin(Method::DELETE, "/personas/office", None);
    assert_eq!(s, 409, "office is in use by vm1: {v}");
    assert!(v["error"].as_str().unwrap().contains("vm1"), "{v}");
    d.admin(
        Method::POST,
        "/trigger_shift",
        Some(&json!({"device_id": "vm1", "persona_id": "travel"})),
    );
    let (s, _) = d.admin(Method::DELETE, "/personas/travel?force=true", None);
    assert_eq!(s, 204, "force deletes a persona in use");

    let (s, v) = d.admin(
        Method::POST,
        "/trigger_shift",
        Some(&json!({"device_id": "vm1", "persona_id": "nobody"})),
    );
    assert_eq!(s, 404, "{v}");
    let (s, _) = d.admin(
        Method::POST,
        "/trigger_shift",
        Some(&json!({"device": "vm1"})),
    );
    assert!(s == 400 || s == 422, "malformed body: {s}");
}

#[test]
fn the_openapi_document_describes_the_api() {
    let (_lab, d) = setup();
    let (s, doc) = d.admin(Method::GET, "/openapi.json", None);
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for path in [
        "/personas",
        "/personas/{id}",
        "/devices",
        "/trigger_shift",
        "/events",
        "/tokens",
        "/status/{id}",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    // Every operation declares the errors it can answer, each in the one error shape.
    assert_eq!(
        doc["components"]["schemas"]["Error"]["required"],
        json!(["error"])
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let with_body = method == "post" || method == "put";
            let mut want = vec!["400", "401", "403", "500"];
            if with_body {
                want.extend(["413", "415", "422"]);
            }
            if path.contains('{') {
                want.push("404");
            }
            for code in want {
                let r = &op["responses"][code];
                assert_eq!(
                    r["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/Error",
                    "{method} {path} {code}: {r}"
                );
            }
        }
    }
}

/// SIGKILL the daemon in the middle of a stream of writes: everything it acknowledged
/// is there after a restart.
#[test]
fn a_sigkill_during_writes_loses_nothing_acknowledged() {
    let (_lab, mut d) = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (socket, admin, stop) = (d.socket.clone(), d.admin.clone(), stop.clone());
        std::thread::spawn(move || {
            let client = persona::client::Client {
                target: persona::client::Target::Unix(socket),
                token: Some(admin),
                cacert: None,
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut acked = Vec::new();
            for i in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let body = persona_body(
                    &format!("w-{i}"),
                    &format!("198.18.{}.{}/24", i / 250, i % 250 + 1),
                );
                match rt.block_on(client.call(Method::POST, "/personas", Some(&body))) {
                    Ok((s, _)) if s.as_u16() == 201 => acked.push(i),
                    _ => break,
                }
            }
            acked
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    d.kill();
    stop.store(true, Ordering::Relaxed);
    let acked = writer.join().unwrap();
    assert!(
        acked.len() > 20,
        "only {} writes before the kill",
        acked.len()
    );
    d.restart();
    for i in &acked {
        let (s, v) = d.admin(Method::GET, &format!("/personas/w-{i}"), None);
        assert_eq!(s, 200, "acknowledged write w-{i} lost");
        assert_eq!(
            v["spec"]["addresses"][0],
            format!("198.18.{}.{}/24", i / 250, i % 250 + 1)
        );
    }
}

#[test]
fn apply_shift_and_events_end_to_end() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start(&lab);
    let applied = d.cli_ok("apply -f examples/");
    assert!(
        applied.contains("persona/office created") && applied.contains("device/vm1 created"),
        "{applied}"
    );
    assert!(
        d.cli_ok("apply -f examples/")
            .contains("device/vm1 unchanged"),
        "apply is idempotent"
    );
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.10"));

    let plan = d.cli_ok("shift vm1 travel --dry-run");
    assert!(plan.contains("+ address 203.0.113.20/24"), "{plan}");
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.10"),
        "a dry run changes nothing"
    );

    let out = d.cli_ok("shift vm1 travel");
    assert!(out.contains("vm1: travel (generation"), "{out}");
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.20"));

    let events = d.cli_ok("events");
    assert!(
        events
            .lines()
            .any(|l| l.contains("office -> travel") && l.contains("ok (generation")),
        "{events}"
    );
    assert!(
        events
            .lines()
            .any(|l| l.contains("office -> travel") && l.contains("dry-run")),
        "{events}"
    );
    let status = d.cli_ok("status vm1");
    assert!(status.starts_with("vm1: travel on pvm1"), "{status}");

    let err = d.cli("shift vm1 nowhere");
    assert!(!err.status.success());
    let stderr = String::from_utf8_lossy(&err.stderr);
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    assert!(stderr.contains("Persona \"nowhere\" not found"), "{stderr}");
}

/// A persona's certificate and key are installed for the device; a TLS hook that fails
/// after the flip rolls the device back to its previous persona, and the log says why.
#[test]
fn tls_is_installed_and_a_failing_step_rolls_back() {
    use std::os::unix::fs::PermissionsExt as _;

    let lab = Lab::new(VmLink::Veth);
    let hook = r#"[ "$PERSONA_PERSONA" != broken ] || { echo "the VM refused the certificate" >&2; exit 3; }"#;
    let d = Daemon::start_with(&lab, &["--tls-hook", hook]);
    d.cli_ok("apply -f examples/");

    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["office.example".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let key_file = d.put_key("office.key", key.serialize_pem().as_bytes());
    for (name, addr) in [("secure", "203.0.113.31/24"), ("broken", "203.0.113.41/24")] {
        let body = json!({"metadata": {"name": name}, "spec": {
            "addresses": [addr],
            "tls": {"certificate": cert.pem(), "keyFile": key_file, "names": ["office.example"]},
        }});
        let (s, v) = d.admin(Method::POST, "/personas", Some(&body));
        assert_eq!(s, 201, "{v}");
    }

    d.cli_ok("shift vm1 secure");
    let current = d.data_dir.join("tls/vm1/current");
    assert_eq!(
        std::fs::read_to_string(current.join("chain.pem")).unwrap(),
        cert.pem()
    );
    let mode = std::fs::metadata(current.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    let installed = std::fs::read_link(&current).unwrap();
    assert_eq!(lab.seen_from_outside().as_deref(), Some("203.0.113.31"));

    let failed = d.cli("shift vm1 broken");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("left on secure")
            && stderr.contains("TLS hook exited with 3: the VM refused the certificate"),
        "{stderr}"
    );
    assert_eq!(
        lab.seen_from_outside().as_deref(),
        Some("203.0.113.31"),
        "back on the previous identity"
    );
    assert_eq!(
        std::fs::read_link(&current).unwrap(),
        installed,
        "the previous TLS files are current again"
    );
    assert!(d.cli_ok("status vm1").starts_with("vm1: secure"));
    let events = d.cli_ok("events");
    assert!(
        events.lines().any(|l| l.contains("secure -> broken")
            && l.contains("rolled back at tls: TLS hook exited with 3")),
        "{events}"
    );

    // A key that does not belong to the certificate is refused at apply time.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_file = d.put_key("other.key", other.serialize_pem().as_bytes());
    let refused = |key_file: &std::path::Path| {
        let body = json!({"metadata": {"name": "mismatch"}, "spec": {
            "addresses": ["203.0.113.50/24"],
            "tls": {"certificate": cert.pem(), "keyFile": key_file, "names": ["office.example"]},
        }});
        let (s, v) = d.admin(Method::POST, "/personas", Some(&body));
        assert_eq!(
            (s, v["field"].as_str()),
            (422, Some("spec.tls.keyFile")),
            "{v}"
        );
        v["error"].as_str().unwrap().to_owned()
    };
    assert!(refused(&other_file).ends_with("does not match the certificate's public key"));

    // Keys only from the key directory: a host file elsewhere (the API's own TLS key, a
    // link to it, one with a loose mode) is refused, and the error says nothing of it.
    let host_key = d.data_dir.join("host-service.key");
    std::fs::write(&host_key, key.serialize_pem()).unwrap();
    let link = d.key_dir().join("link.key");
    std::os::unix::fs::symlink(&host_key, &link).unwrap();
    let loose = d.put_key("loose.key", key.serialize_pem().as_bytes());
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (file, want) in [
        (host_key.clone(), "must name a file in the key directory"),
        (
            "/etc/shadow".into(),
            "must name a file in the key directory",
        ),
        (
            "../host-service.key".into(),
            "must name a file in the key directory",
        ),
        (link, "a link that leads out of the key directory"),
        (loose, "has mode 0644"),
    ] {
        let e = refused(&file);
        assert!(
            e.starts_with(&format!("spec.tls.keyFile: {want}")),
            "{}: {e}",
            file.display()
        );
        assert!(
            !e.contains("PRIVATE KEY") && !e.contains("host-service"),
            "{e}"
        );
    }
}

#[test]
fn the_api_serves_https_and_clients_verify_it() {
    let lab = Lab::new(VmLink::Veth);
    let dir = std::path::PathBuf::from(format!("/tmp/persona-api-tls-{}", lab.host.name));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.self_signed(&key).unwrap();
    let (cert_file, key_file) = (dir.join("api.pem"), dir.join("api.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let d = Daemon::start_with(
        &lab,
        &[
            "--listen",
            "127.0.0.1:7443",
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    d.cli_ok("apply -f examples/");

    let cli = |extra: &[&str]| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", lab.host.name))
            .arg(persona_tests::lab::persona_bin())
            .args(["--server", "https://127.0.0.1:7443", "--token", &d.admin])
            .args(extra)
            .args(["get", "personas"])
            .output()
            .unwrap()
    };
    let ok = cli(&["--cacert", cert_file.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("office"));
    let untrusted = cli(&[]);
    assert!(
        !untrusted.status.success(),
        "a server whose certificate is not trusted is refused"
    );
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("TLS with 127.0.0.1:7443"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );

    let curl = lab.host.exec(&format!(
        "curl -sS --cacert {} -H \"Authorization: Bearer {}\" https://127.0.0.1:7443/devices/vm1",
        cert_file.display(),
        d.admin
    ));
    let v: Value = serde_json::from_str(&curl).expect("JSON over HTTPS");
    assert_eq!(v["spec"]["interface"], "pvm1");
    let plain = lab
        .host
        .try_exec("curl -sS --max-time 3 http://127.0.0.1:7443/healthz");
    assert!(
        !String::from_utf8_lossy(&plain.stdout).contains("ok"),
        "no plain HTTP on the TLS port"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn events_follow_prints_shifts_as_they_happen() {
    use std::io::BufRead as _;

    let (_lab, d) = setup();
    let mut follow = std::process::Command::new(persona_tests::lab::persona_bin())
        .args([
            "--server",
            &format!("unix:{}", d.socket.display()),
            "--data-dir",
            d.data_dir.to_str().unwrap(),
        ])
        .args(["events", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    // The history first, up to the first shift to office.
    let mut first = Vec::new();
    for line in (&mut lines).take(20) {
        let line = line.unwrap();
        let done = line.contains("shift") && line.contains("office");
        first.push(line);
        if done {
            break;
        }
    }
    assert!(
        first
            .last()
            .is_some_and(|l| l.contains("shift") && l.contains("office")),
        "{first:?}"
    );
    assert!(
        first
            .iter()
            .any(|l| l.contains("shift") && l.contains("office")),
        "{first:?}"
    );
    d.cli_ok("shift vm1 travel");
    // The rest of the history (vm2's) may come first; the new shift follows it.
    let next = (&mut lines)
        .take(20)
        .map(|l| l.unwrap())
        .find(|l| l.contains("vm1") && l.contains("travel"))
        .expect("a line for the new shift");
    assert!(
        next.contains("office -> travel") && next.contains("ok (generation "),
        "{next}"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();
}

#[test]
fn shell_completions_are_generated() {
    let out = std::process::Command::new(persona_tests::lab::persona_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("complete -F") && script.contains("shift"),
        "bash completion script for persona"
    );
}

/// Many requests on one kept-alive connection, in a thread of their own, until `stop`:
/// what `call(i)` got acknowledged (2xx), as `ack` makes of the answer.
fn hammer<T: Send + 'static>(
    d: &Daemon,
    stop: &Arc<AtomicBool>,
    call: impl Fn(usize) -> (&'static str, Value) + Send + 'static,
    ack: impl Fn(usize, &Value) -> T + Send + 'static,
) -> std::thread::JoinHandle<Vec<T>> {
    let client = d.client(Some(&d.admin));
    let stop = stop.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut acked = Vec::new();
            let Ok(mut conn) = client.connect().await else {
                return acked;
            };
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (path, body) = call(i);
                match conn.call(Method::POST, path, Some(&body)).await {
                    Ok((s, v)) if s.is_success() => acked.push(ack(i, &v)),
                    _ => break,
                }
            }
            acked
        })
    })
}

#[test]
fn a_sigkill_during_concurrent_signals_and_shifts_loses_nothing_acknowledged() {
    let (_lab, mut d) = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let shifts = hammer(
        &d,
        &stop,
        |i| {
            let to = if i % 2 == 0 { "travel" } else { "office" };
            (
                "/trigger_shift",
                json!({ "device_id": "vm1", "persona_id": to }),
            )
        },
        |_, v| {
            (
                v["event"].as_u64().unwrap(),
                v["generation"].as_u64().unwrap(),
            )
        },
    );
    // Applications no rule asks about: stored, and nothing shifts for them.
    let feeds: Vec<_> = (0..3)
        .map(|t| {
            hammer(
                &d,
                &stop,
                move |i| {
                    let app = format!("probe-{t}-{i}");
                    (
                        "/context",
                        json!([{ "device": "vm2", "kind": "app", "app": app, "active": true }]),
                    )
                },
                move |i, _| format!("vm2/app/probe-{t}-{i}"),
            )
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    d.kill();
    stop.store(true, Ordering::Relaxed);
    let shifted = shifts.join().unwrap();
    let signalled: Vec<String> = feeds.into_iter().flat_map(|f| f.join().unwrap()).collect();
    assert!(
        shifted.len() > 10,
        "only {} shifts before the kill",
        shifted.len()
    );
    assert!(
        signalled.len() > 30,
        "only {} signals before the kill",
        signalled.len()
    );

    // The file as the killed daemon left it.
    let store = persona::store::embedded::EmbeddedStore::open(&d.data_dir.join("store.redb"))
        .expect("opening the store the daemon left");
    use persona::store::Store as _;
    let stored: std::collections::HashSet<String> = store
        .signals()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}/app/{}",
                s["device"].as_str().unwrap(),
                s["app"].as_str().unwrap_or("")
            )
        })
        .collect();
    for key in &signalled {
        assert!(stored.contains(key), "acknowledged signal {key} lost");
    }
    let events: std::collections::HashMap<u64, persona::store::Event> = store
        .events(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e))
        .collect();
    for (seq, generation) in &shifted {
        let e = events
            .get(seq)
            .unwrap_or_else(|| panic!("acknowledged shift's audit record {seq} lost"));
        assert_eq!(
            (e.body.kind.as_str(), e.body.generation),
            ("shift", Some(*generation))
        );
    }
    let newest = shifted.iter().map(|s| s.0).max().unwrap();
    let last = shifted.iter().map(|s| s.1).max().unwrap();
    let state = store.device_state("vm1").unwrap().expect("vm1's state");
    if state.generation == 0 {
        // Killed between a shift's logged intent and its answer: the intent stands, as a
        // shift after every acknowledged one, and the daemon applies it again at start.
        let recovered = events
            .values()
            .find(|e| e.body.detail.get("recovered").is_some())
            .expect("a state of unknown generation comes from a recovered intent");
        assert!(
            recovered.seq > newest && recovered.body.to.as_deref() == Some(&state.persona),
            "recovered {recovered:?} against the last acknowledged shift {newest}, state {state:?}"
        );
    } else {
        assert!(
            state.generation >= last,
            "vm1 at {} after acknowledging {last}",
            state.generation
        );
    }
    drop(store);
    d.restart();
    wait_until("vm1 back on the persona the store holds", || {
        let (s, status) = d.admin(Method::GET, "/status/vm1", None);
        assert_eq!(s, 200, "the daemon starts on what it left: {status}");
        status["persona"].as_str() == Some(state.persona.as_str())
            && status["generation"].as_u64() > Some(0)
    });
}

/// Schemathesis, an OpenAPI fuzzer, reads the served document and sends what it derives
/// from it (boundary values, then random and malformed input) to every operation: every
/// answer must be one the document declares, in its shape, no server error, no request
/// outside the document accepted, none accepted without a token. Not checked: that every
/// schema-valid body is accepted, since a spec's meaning (a certificate that parses, a
/// persona that exists) is more than its JSON Schema says. One worker: schemathesis's
/// threads trip a CPython `ast.parse` race ("AST constructor recursion depth mismatch").
#[test]
fn an_openapi_fuzzer_finds_nothing_wrong() {
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start_with(&lab, &["--listen", "127.0.0.1:7070"]);
    d.cli_ok("apply -f examples/");
    let out = lab.host.try_exec(&format!(
        "{} --config-file {}/fuzz/schemathesis.toml run http://127.0.0.1:7070/openapi.json \
         -H 'Authorization: Bearer {}' --checks all --exclude-checks positive_data_acceptance \
         --max-examples 10 --workers 1 --seed 7 --request-timeout 30 --max-response-time 30 \
         --no-color 2>&1",
        persona_tests::lab::schemathesis(),
        env!("CARGO_MANIFEST_DIR"),
        d.admin
    ));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(report.contains(" passed, "), "{report}");
}

/// `--socket-group`: the socket is its group's to use (0660), and nobody else's.
#[test]
fn the_socket_belongs_to_the_group_given() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let lab = Lab::new(VmLink::Veth);
    let d = Daemon::start_with(&lab, &["--socket-group", "nogroup"]);
    let meta = std::fs::metadata(&d.socket).unwrap();
    let nogroup = nix::unistd::Group::from_name("nogroup").unwrap().unwrap();
    assert_eq!(meta.gid(), nogroup.gid.as_raw());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    d.cli_ok("get personas"); // and root still reaches it
}
