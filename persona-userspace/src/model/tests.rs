use super::*;
use crate::datapath::compile;

const GOOD: &str = r#"
apiVersion: persona.dev/v1
kind: Persona
metadata: { name: office }
spec:
  addresses: ["203.0.113.10/24"]
  gateway: 203.0.113.1
  dns: ["198.51.100.53"]
  firewall:
    ingress:
      default: drop
      rules:
        - { cidr: 198.51.100.0/24, protocol: tcp, ports: "22", action: allow }
"#;

fn error_of(yaml: &str) -> String {
    match parse_manifests(yaml) {
        Ok(m) => panic!("expected an error, parsed {m:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_good_manifest_parses_and_compiles() {
    let m = parse_manifests(GOOD).expect("parses");
    let Manifest::Persona { spec, .. } = &m[0] else {
        panic!("a persona")
    };
    let c = compile(spec).expect("compiles");
    assert_eq!(c.table.addr_v4, [203, 0, 113, 10]);
    assert_eq!(c.firewall.v4.len(), 1);
    assert_eq!(c.firewall.v4[0].rules.count, 1);
}

#[test]
fn bad_manifests_name_the_field_and_the_reason() {
    let cases = [
        (
            GOOD.replace("ports: \"22\"", "ports: 70000"),
            "document 1, line 13, column 11: spec.firewall.ingress.rules[0].ports: 70000 is not a port",
        ),
        (
            GOOD.replace("ports: \"22\"", "ports: \"30-20\""),
            "range 30-20 is empty",
        ),
        (
            GOOD.replace("198.51.100.0/24", "198.51.100.7/24"),
            "spec.firewall.ingress.rules[0].cidr: 198.51.100.7/24 has host bits set; did you mean 198.51.100.0/24?",
        ),
        (
            GOOD.replace("198.51.100.0/24", "198.51.300.0/24"),
            "line 13, column 19: spec.firewall.ingress.rules[0].cidr: invalid IP address syntax",
        ),
        (
            GOOD.replace("[\"203.0.113.10/24\"]", "[\"203.0.113.10/24\", \"203.0.113.300/24\"]"),
            "line 6, column 34: spec.addresses[1]: invalid IP address syntax",
        ),
        (
            GOOD.replace("gateway: 203.0.113.1", "gateway: 192.0.2.1"),
            "Persona \"office\": spec.gateway: 192.0.2.1 is not inside any of the persona's prefixes",
        ),
        (
            GOOD.replace("protocol: tcp", "protocol: icmp"),
            "spec.firewall.ingress.rules[0].ports: icmp has no ports",
        ),
        (
            GOOD.replace("[\"203.0.113.10/24\"]", "[]"),
            "spec.addresses: at least one address (or an addressPool) is required",
        ),
        (
            GOOD.replace(
                "[\"203.0.113.10/24\"]",
                "[\"203.0.113.10/24\"]\n  addressPool: [\"203.0.113.64/28\"]",
            ),
            "spec.addresses: 2 IPv4 addresses or pools given; a persona has at most one per family",
        ),
        (
            GOOD.replace(
                "addresses: [\"203.0.113.10/24\"]",
                "addressPool: [\"203.0.113.65/28\"]",
            ),
            "spec.addressPool[0]: 203.0.113.65/28 is not a network: write 203.0.113.64/28",
        ),
        (
            GOOD.replace(
                "[\"203.0.113.10/24\"]",
                "[\"203.0.113.10/24\", \"203.0.113.11/24\"]",
            ),
            "spec.addresses: 2 IPv4 addresses or pools given; a persona has at most one per family",
        ),
        (
            GOOD.replace("dns: [\"198.51.100.53\"]", "dns: [\"2001:db8::53\"]"),
            "spec.dns[0]: 2001:db8::53: the persona has no address of this family",
        ),
        (
            GOOD.replace("name: office", "name: Office"),
            "metadata.name: \"Office\" must be 1-63 lowercase letters",
        ),
        (
            GOOD.replace("persona.dev/v1", "persona.dev/v9"),
            "apiVersion: \"persona.dev/v9\" is not supported",
        ),
        (
            GOOD.replace("action: allow", "action: permit"),
            "unknown variant `permit`",
        ),
        (
            GOOD.replace("gateway:", "gatway:"),
            "unknown field `gatway`",
        ),
        (
            GOOD.replace("kind: Persona", "kind: Persna"),
            "unknown variant `Persna`",
        ),
        (
            GOOD.replace(
                "        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n",
                "        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: drop }\n",
            ),
            "spec.firewall.ingress.rules[1]: contradicts rules[0] (same cidr, protocol and ports)",
        ),
    ];
    for (yaml, want) in cases {
        let got = error_of(&yaml);
        assert!(got.contains(want), "error {got:?} should contain {want:?}");
    }
}

#[test]
fn too_many_rules_for_one_prefix_is_refused_by_the_compiler() {
    let rules: String = (1..=17)
        .map(|p| format!("        - {{ cidr: 198.51.100.0/24, protocol: tcp, ports: \"{p}\", action: allow }}\n"))
        .collect();
    let yaml = GOOD.replace(
        "        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n",
        &rules,
    );
    let m = parse_manifests(&yaml).expect("parses");
    let Manifest::Persona { spec, .. } = &m[0] else {
        panic!()
    };
    let err = compile(spec)
        .expect_err("17 rules on one prefix")
        .to_string();
    assert!(
        err.contains("spec.firewall.ingress.rules: 17 rules apply to 198.51.100.0/24"),
        "{err}"
    );
}

#[test]
fn wider_prefixes_rules_are_folded_behind_the_narrower_ones() {
    let yaml = GOOD.replace(
        "        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n",
        "        - { cidr: 0.0.0.0/0, protocol: udp, action: allow }\n        - { cidr: 198.51.100.128/25, action: drop }\n        - { cidr: 198.51.100.0/24, protocol: tcp, ports: \"22\", action: allow }\n",
    );
    let m = parse_manifests(&yaml).expect("parses");
    let Manifest::Persona { spec, .. } = &m[0] else {
        panic!()
    };
    let c = compile(spec).expect("compiles");
    let slash25 = c
        .firewall
        .v4
        .iter()
        .find(|p| p.net.prefix_len() == 25)
        .expect("/25");
    let protos: Vec<u8> = slash25.rules.rules[..slash25.rules.count as usize]
        .iter()
        .map(|r| r.proto)
        .collect();
    // Its own drop-all, then the /24's tcp/22, then the /0's udp.
    assert_eq!(protos, [0, 6, 17]);
}

#[test]
fn several_documents_in_one_stream() {
    let two = format!(
        "{GOOD}---\n{}",
        GOOD.replace("name: office", "name: travel")
    );
    let names: Vec<String> = parse_manifests(&two)
        .expect("parses")
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    assert_eq!(names, ["office", "travel"]);
}

proptest::proptest! {
    #[test]
    fn arbitrary_text_never_panics_the_parser(text in "\\PC{0,400}") {
        let _ = parse_manifests(&text);
    }

    #[test]
    fn mutated_manifests_never_panic(pos in 0usize..400, byte in proptest::num::u8::ANY) {
        let mut bytes = GOOD.as_bytes().to_vec();
        let at = pos % bytes.len();
        bytes[at] = byte;
        if let Ok(text) = String::from_utf8(bytes)
            && let Ok(manifests) = parse_manifests(&text)
        {
            for m in manifests {
                if let Manifest::Persona { spec, .. } = m {
                    let _ = compile(&spec);
                }
            }
        }
    }
}

#[test]
fn personas_clash_on_a_shared_address_or_overlapping_pools() {
    let p = |y: &str| -> PersonaSpec { serde_yaml::from_str(y).unwrap() };
    let office = p("addresses: [203.0.113.10/24]");
    let pooled = p("addressPool: [203.0.113.0/28]");
    let other_pool = p("addressPool: [203.0.113.8/29]");
    let apart = p("addressPool: [203.0.113.64/28]");
    assert_eq!(
        office
            .clashes_with(&p("addresses: [203.0.113.10/32]"))
            .as_deref(),
        Some("203.0.113.10 is its address too")
    );
    assert_eq!(
        office.clashes_with(&pooled).as_deref(),
        Some("203.0.113.10 is in its pool 203.0.113.0/28")
    );
    assert_eq!(
        pooled.clashes_with(&office).as_deref(),
        Some("pool 203.0.113.0/28 holds its address 203.0.113.10")
    );
    assert!(pooled.clashes_with(&other_pool).is_some());
    assert_eq!(pooled.clashes_with(&apart), None);
    assert_eq!(office.clashes_with(&apart), None);
}

mod tls_and_vpn {
    use std::net::IpAddr;

    use rcgen::{CertificateParams, KeyPair, SanType, date_time_ymd};

    use super::*;
    use crate::keys::KeyDir;

    struct Cert {
        pem: String,
        key_file: std::path::PathBuf,
    }

    fn cert(names: &[&str], ips: &[&str], expired: bool, tag: &str) -> Cert {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        for ip in ips {
            params
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse::<IpAddr>().unwrap()));
        }
        if expired {
            params.not_before = date_time_ymd(2019, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 1);
        }
        let c = params.self_signed(&key).expect("self-signed");
        let key_file = key_dir().path().join(format!("{tag}.key"));
        write_key(&key_file, key.serialize_pem().as_bytes());
        Cert {
            pem: c.pem(),
            key_file,
        }
    }

    fn key_dir() -> KeyDir {
        let dir = std::env::temp_dir().join(format!("persona-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        KeyDir::new(dir)
    }

    fn write_key(path: &std::path::Path, bytes: &[u8]) {
        crate::keys::tests::put_key(path, bytes, 0o600);
    }

    fn persona_with_tls(c: &Cert, key_file: &std::path::Path, names: &[&str]) -> PersonaSpec {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        serde_json::from_value(serde_json::json!({
            "addresses": ["203.0.113.10/24"],
            "tls": { "certificate": c.pem, "keyFile": key_file, "names": names },
        }))
        .unwrap()
    }

    #[test]
    fn a_matching_certificate_and_key_pass() {
        let c = cert(&["office.example"], &["203.0.113.10"], false, "good");
        let p = persona_with_tls(&c, &c.key_file, &["office.example"]);
        p.validate().expect("valid");
        p.validate_secrets(&key_dir()).expect("key matches");
        let relative = persona_with_tls(&c, std::path::Path::new("good.key"), &[]);
        relative
            .validate_secrets(&key_dir())
            .expect("a name relative to the key directory");
        let by_address = persona_with_tls(&c, &c.key_file, &[]);
        by_address.validate().expect("covers the address");
    }

    #[test]
    fn certificate_problems_name_the_field() {
        let good = cert(&["office.example"], &[], false, "a");
        let other = cert(&["office.example"], &[], false, "b");
        let expired = cert(&["office.example"], &[], true, "c");
        let cases: Vec<(PersonaSpec, &str)> = vec![
            (
                persona_with_tls(&expired, &expired.key_file, &["office.example"]),
                "spec.tls.certificate: expired on",
            ),
            (
                persona_with_tls(&good, &good.key_file, &["shop.example"]),
                "spec.tls.names[0]: \"shop.example\" is not covered",
            ),
            (
                persona_with_tls(&good, &good.key_file, &[]),
                "spec.tls.certificate: does not cover the persona's address 203.0.113.10",
            ),
            (
                persona_with_tls(
                    &Cert {
                        pem: "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n"
                            .into(),
                        key_file: good.key_file.clone(),
                    },
                    &good.key_file,
                    &[],
                ),
                "spec.tls.certificate",
            ),
        ];
        for (p, want) in cases {
            let e = p.validate().expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let mismatched = persona_with_tls(&good, &other.key_file, &["office.example"]);
        mismatched
            .validate()
            .expect("the certificate itself is fine");
        let e = mismatched
            .validate_secrets(&key_dir())
            .expect_err("wrong key")
            .to_string();
        assert!(
            e.contains("spec.tls.keyFile: does not match the certificate"),
            "{e}"
        );
        let missing = persona_with_tls(&good, std::path::Path::new("gone.pem"), &[]);
        assert_eq!(
            missing
                .validate_secrets(&key_dir())
                .unwrap_err()
                .to_string(),
            "spec.tls.keyFile: no such file in the key directory"
        );
    }

    /// A chain leaf-first: each certificate must be signed by the next one's key.
    #[test]
    fn the_chain_signatures_are_verified() {
        use rcgen::{BasicConstraints, DnType, IsCa, Issuer};
        let ca_params = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let params = ca_params(name);
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let (ca_pem, ca_issuer) = ca("persona test ca");
        // Same name, another key: what a forged intermediate looks like.
        let (forged_pem, _) = ca("persona test ca");
        let (other_pem, _) = ca("another ca");
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["office.example".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca_issuer)
            .unwrap();
        let key_file = key_dir().path().join("chained.key");
        write_key(&key_file, leaf_key.serialize_pem().as_bytes());
        let with = |chain: String| Cert {
            pem: chain,
            key_file: key_file.clone(),
        };
        let good = with(format!("{}{ca_pem}", leaf.pem()));
        let p = persona_with_tls(&good, &good.key_file, &["office.example"]);
        p.validate().expect("a chain signed link by link");
        p.validate_secrets(&key_dir()).expect("the leaf's key");
        persona_with_tls(&with(leaf.pem()), &key_file, &["office.example"])
            .validate()
            .expect("a leaf without its issuer");
        // Root, intermediate, leaf: whole, or without the root.
        let inter_key = KeyPair::generate().unwrap();
        let inter_params = ca_params("persona test intermediate");
        let inter = inter_params
            .clone()
            .signed_by(&inter_key, &ca_issuer)
            .unwrap();
        let inter_issuer = Issuer::new(inter_params, inter_key);
        let leaf_key = KeyPair::generate().unwrap();
        let deep_leaf = CertificateParams::new(vec!["office.example".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &inter_issuer)
            .unwrap();
        let deep_key = key_dir().path().join("deep.key");
        write_key(&deep_key, leaf_key.serialize_pem().as_bytes());
        for chain in [
            format!("{}{}{ca_pem}", deep_leaf.pem(), inter.pem()),
            format!("{}{}", deep_leaf.pem(), inter.pem()),
        ] {
            let p = persona_with_tls(
                &Cert {
                    pem: chain,
                    key_file: deep_key.clone(),
                },
                &deep_key,
                &["office.example"],
            );
            p.validate().expect("a three-link chain");
            p.validate_secrets(&key_dir()).expect("its leaf's key");
        }
        for (chain, want) in [
            (
                format!("{}{forged_pem}", leaf.pem()),
                "spec.tls.certificate: certificate 1's signature does not verify",
            ),
            (
                format!("{}{other_pem}", leaf.pem()),
                "spec.tls.certificate: certificate 1 was not issued by the next one",
            ),
        ] {
            let e = persona_with_tls(&with(chain), &key_file, &["office.example"])
                .validate()
                .expect_err(want)
                .to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
    }

    #[test]
    fn vpn_settings_are_checked() {
        let key = "hJ4tC8bS8xJcK9yFbUg6E+2mYf3B4W7p1dZkVxQm0lE=";
        let vpn = |over: serde_json::Value| -> PersonaSpec {
            let mut wg = serde_json::json!({
                "privateKeyFile": "/etc/persona/wg.key",
                "peerPublicKey": key,
                "endpoint": "198.51.100.9:51820",
                "allowedIps": ["0.0.0.0/0"],
            });
            for (k, v) in over.as_object().unwrap() {
                wg[k] = v.clone();
            }
            serde_json::from_value(
                serde_json::json!({"addresses": ["203.0.113.10/24"], "vpn": {"wireguard": wg}}),
            )
            .unwrap()
        };
        vpn(serde_json::json!({})).validate().expect("valid");
        for (over, want) in [
            (
                serde_json::json!({"peerPublicKey": "short"}),
                "spec.vpn.wireguard.peerPublicKey: is not a base64 WireGuard key",
            ),
            (
                serde_json::json!({"endpoint": "198.51.100.9"}),
                "spec.vpn.wireguard.endpoint",
            ),
            (
                serde_json::json!({"endpoint": "198.51.100.9:0"}),
                "spec.vpn.wireguard.endpoint",
            ),
            (
                serde_json::json!({"allowedIps": []}),
                "spec.vpn.wireguard.allowedIps: at least one prefix",
            ),
        ] {
            let e = vpn(over).validate().expect_err(want).to_string();
            assert!(e.contains(want), "{e:?} should contain {want:?}");
        }
        let keys = key_dir();
        let at = |name: &str| serde_json::json!({"privateKeyFile": keys.path().join(name)});
        let e = vpn(at("wg-missing.key"))
            .validate_secrets(&keys)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "spec.vpn.wireguard.privateKeyFile: no such file in the key directory"
        );
        write_key(&keys.path().join("wg.key"), key.as_bytes());
        vpn(at("wg.key"))
            .validate_secrets(&keys)
            .expect("a key in the key directory");
        write_key(&keys.path().join("wg-bad.key"), b"not a key");
        let e = vpn(at("wg-bad.key"))
            .validate_secrets(&keys)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "spec.vpn.wireguard.privateKeyFile: holds no WireGuard key"
        );
        let missing_field = serde_json::from_value::<PersonaSpec>(serde_json::json!({
            "addresses": ["203.0.113.10/24"],
            "vpn": {"wireguard": {"peerPublicKey": key, "endpoint": "198.51.100.9:51820", "allowedIps": ["0.0.0.0/0"]}}
        }));
        assert!(
            missing_field
                .unwrap_err()
                .to_string()
                .contains("missing field `privateKeyFile`")
        );
    }
}

#[test]
fn interface_names_are_what_linux_takes_without_its_templates() {
    use crate::model::check_interface_name;
    for ok in ["pvm1", "vnet0", "pt-lv1", "tap_a.b"] {
        assert!(check_interface_name(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "pt%d",
        "a b",
        "a/b",
        "a:b",
        ".",
        "..",
        "sixteen-chars-xx",
    ] {
        let e = check_interface_name(bad).unwrap_err();
        assert!(e.contains("is not an interface name"), "{bad}: {e}");
    }
}
