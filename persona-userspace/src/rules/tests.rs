use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

use super::{
    RuleSpec,
    engine::{CompiledRules, DeviceView, History, Timing, decide, decide_incremental, decide_with},
    schedule::Schedule,
    signals::{Signal, SignalSet},
};

const RULES: &str = r#"
lockdown:
  priority: 100
  persona: hardened
  when: { alert: { minSeverity: high } }
  holdUntilClear: true
  immediate: true
admins:
  priority: 30
  persona: admin
  when: { role: { in: [admin] } }
abroad:
  priority: 50
  persona: travel
  when: { country: { notIn: [DE] } }
video:
  priority: 20
  persona: media
  when: { apps: { anyOf: [zoom] } }
lab:
  priority: 40
  persona: lab
  when: { expression: 'device.labels.team == "finance" && signals.apps.size() > 1' }
office-hours:
  priority: 10
  persona: office
  when: { schedule: { timezone: Europe/Berlin, days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00" } }
others:
  priority: 99
  persona: other
  selector: { matchLabels: { team: research } }
"#;

fn rules() -> BTreeMap<String, RuleSpec> {
    let r: BTreeMap<String, RuleSpec> = serde_yaml::from_str(RULES).expect("rules parse");
    for spec in r.values() {
        spec.validate().expect("rules validate");
    }
    r
}

fn device() -> DeviceView {
    DeviceView {
        name: "vm1".into(),
        spec: std::sync::Arc::new(
            serde_yaml::from_str(
                "interface: tap1\nlabels: { team: finance }\nowner: alice\nrole: analyst\npersona: home\n",
            )
            .expect("device spec"),
        ),
    }
}

const TIMING: Timing = Timing {
    dwell: SignedDuration::from_secs(30),
    cooldown: SignedDuration::from_secs(60),
};

/// Tuesday 2026-11-24, 10:00 in Berlin (CET, UTC+1).
fn tuesday_10() -> Timestamp {
    "2026-11-24T09:00:00Z".parse().unwrap()
}

fn signal(json: &str, at: Timestamp) -> Signal {
    let mut s: Signal = serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
    s.at.get_or_insert(at);
    s
}

fn set(signals: &[Signal]) -> SignalSet {
    let mut s = SignalSet::default();
    for x in signals {
        s.merge(x.clone());
    }
    s
}

fn at_rest(persona: &str, since: Timestamp) -> History {
    History {
        persona: Some(persona.into()),
        rule: None,
        since: Some(since),
        left: BTreeMap::new(),
    }
}

#[test]
fn each_trigger_kind_and_priorities() {
    let now = tuesday_10();
    let long_ago = now - SignedDuration::from_hours(1);
    let cases: Vec<(&str, Vec<&str>, Timestamp, Option<&str>)> = vec![
        ("office hours", vec![], now, Some("office")),
        (
            "evening: default persona",
            vec![],
            "2026-11-24T19:30:00Z".parse().unwrap(),
            Some("home"),
        ),
        (
            "saturday: default persona",
            vec![],
            "2026-11-28T09:00:00Z".parse().unwrap(),
            Some("home"),
        ),
        (
            "high alert",
            vec![r#"{"device":"vm1","kind":"alert","id":"a1","severity":"high"}"#],
            now,
            Some("hardened"),
        ),
        (
            "low alert is not enough",
            vec![r#"{"device":"vm1","kind":"alert","id":"a1","severity":"low"}"#],
            now,
            Some("office"),
        ),
        (
            "cleared alert",
            vec![
                r#"{"device":"vm1","kind":"alert","id":"a1","severity":"critical","state":"cleared"}"#,
            ],
            now,
            Some("office"),
        ),
        (
            "abroad",
            vec![r#"{"device":"vm1","kind":"geo","country":"FR"}"#],
            now,
            Some("travel"),
        ),
        (
            "at home country",
            vec![r#"{"device":"vm1","kind":"geo","country":"DE"}"#],
            now,
            Some("office"),
        ),
        (
            "video call beats office hours",
            vec![r#"{"device":"vm1","kind":"app","app":"zoom"}"#],
            now,
            Some("media"),
        ),
        (
            "an app that stopped",
            vec![r#"{"device":"vm1","kind":"app","app":"zoom","active":false}"#],
            now,
            Some("office"),
        ),
        (
            "admin role beats video",
            vec![
                r#"{"device":"vm1","kind":"app","app":"zoom"}"#,
                r#"{"device":"vm1","kind":"role","role":"admin"}"#,
            ],
            now,
            Some("admin"),
        ),
        (
            "CEL expression",
            vec![
                r#"{"device":"vm1","kind":"app","app":"zoom"}"#,
                r#"{"device":"vm1","kind":"app","app":"ssh"}"#,
            ],
            now,
            Some("lab"),
        ),
        (
            "alert beats everything",
            vec![
                r#"{"device":"vm1","kind":"geo","country":"FR"}"#,
                r#"{"device":"vm1","kind":"alert","id":"a2","severity":"critical"}"#,
            ],
            now,
            Some("hardened"),
        ),
    ];
    for (name, signals, when, want) in cases {
        let signals: Vec<Signal> = signals.iter().map(|s| signal(s, when)).collect();
        let d = decide(
            &device(),
            &rules(),
            &set(&signals),
            &at_rest("none", long_ago),
            TIMING,
            when,
        );
        assert_eq!(d.desired.as_deref(), want, "{name}: {}", d.why);
        assert!(d.shift, "{name}: nothing blocks it: {}", d.why);
    }
}

#[test]
fn a_device_no_rule_selects_is_left_alone() {
    let mut research = device();
    std::sync::Arc::make_mut(&mut research.spec).labels =
        [("team".to_string(), "sales".to_string())].into();
    let mut only_research = BTreeMap::new();
    only_research.insert("others".to_string(), rules()["others"].clone());
    let d = decide(
        &research,
        &only_research,
        &SignalSet::default(),
        &History::default(),
        TIMING,
        tuesday_10(),
    );
    assert_eq!(d.desired, None);
    assert!(
        d.rules[0].reasons[0].contains("needs team=research"),
        "{:?}",
        d.rules
    );
}

#[test]
fn an_expired_signal_stops_matching_and_says_when() {
    let now = tuesday_10();
    let s = signal(
        r#"{"device":"vm1","kind":"geo","country":"FR","ttl":600}"#,
        now,
    );
    let signals = set(&[s]);
    let hist = at_rest("office", now - SignedDuration::from_hours(1));
    let d = decide(
        &device(),
        &rules(),
        &signals,
        &hist,
        TIMING,
        now + SignedDuration::from_mins(5),
    );
    assert_eq!(d.desired.as_deref(), Some("travel"));
    assert_eq!(
        d.next_check,
        Some(now + SignedDuration::from_mins(10)),
        "the engine wakes when it expires"
    );
    let later = decide(
        &device(),
        &rules(),
        &signals,
        &hist,
        TIMING,
        now + SignedDuration::from_mins(10),
    );
    assert_eq!(
        later.desired.as_deref(),
        Some("office"),
        "expired: {}",
        later.why
    );
}

#[test]
fn dwell_and_cooldown_hold_back_non_urgent_shifts() {
    let now = tuesday_10();
    let abroad = set(&[signal(
        r#"{"device":"vm1","kind":"geo","country":"FR"}"#,
        now,
    )]);
    let just_arrived = at_rest("office", now - SignedDuration::from_secs(10));
    let d = decide(&device(), &rules(), &abroad, &just_arrived, TIMING, now);
    assert_eq!((d.desired.as_deref(), d.shift), (Some("travel"), false));
    assert_eq!(d.blocked_until, Some(now + SignedDuration::from_secs(20)));
    assert_eq!(d.next_check, d.blocked_until);

    let mut left_travel = at_rest("office", now - SignedDuration::from_hours(1));
    left_travel
        .left
        .insert("travel".into(), now - SignedDuration::from_secs(5));
    let d = decide(&device(), &rules(), &abroad, &left_travel, TIMING, now);
    assert_eq!(
        d.blocked_until,
        Some(now + SignedDuration::from_secs(55)),
        "cool-down before going back"
    );

    // Hardening does not wait.
    let alert = set(&[signal(
        r#"{"device":"vm1","kind":"alert","id":"x","severity":"high"}"#,
        now,
    )]);
    let d = decide(&device(), &rules(), &alert, &just_arrived, TIMING, now);
    assert_eq!((d.desired.as_deref(), d.shift), (Some("hardened"), true));
}

#[test]
fn a_hardened_persona_is_held_until_the_alert_clears() {
    let now = tuesday_10();
    let raised = signal(
        r#"{"device":"vm1","kind":"alert","id":"a1","severity":"high"}"#,
        now,
    );
    let abroad = signal(r#"{"device":"vm1","kind":"geo","country":"FR"}"#, now);
    let hist = History {
        persona: Some("hardened".into()),
        rule: Some("lockdown".into()),
        since: Some(now),
        left: BTreeMap::new(),
    };
    // A rule of higher priority than travel, but below lockdown, would win without the hold.
    let mut rs = rules();
    rs.get_mut("lockdown").unwrap().priority = 1;
    let d = decide(
        &device(),
        &rs,
        &set(&[raised.clone(), abroad.clone()]),
        &hist,
        TIMING,
        now,
    );
    assert_eq!(d.desired.as_deref(), Some("hardened"), "{}", d.why);
    assert!(d.why.contains("held by lockdown"), "{}", d.why);

    let cleared = signal(
        r#"{"device":"vm1","kind":"alert","id":"a1","severity":"high","state":"cleared"}"#,
        now + SignedDuration::from_secs(1),
    );
    let d = decide(
        &device(),
        &rs,
        &set(&[raised, abroad, cleared]),
        &hist,
        TIMING,
        now + SignedDuration::from_mins(5),
    );
    assert_eq!(d.desired.as_deref(), Some("travel"), "{}", d.why);
}

#[test]
fn schedules_fire_at_their_boundaries_across_daylight_saving() {
    let s = Schedule {
        timezone: "Europe/Berlin".into(),
        days: vec![],
        from: "08:00".into(),
        to: "18:00".into(),
    };
    let c = s.compile("s").unwrap();
    // Saturday 2026-03-28 18:30 CET (UTC+1): the next start is Sunday 08:00 CEST (UTC+2),
    // the day the clocks go forward, which is 06:00 UTC and not 07:00.
    let evening: Timestamp = "2026-03-28T17:30:00Z".parse().unwrap();
    assert!(!c.active(evening));
    assert_eq!(
        c.next_boundary(evening),
        Some("2026-03-29T06:00:00Z".parse().unwrap())
    );
    assert!(c.active("2026-03-29T06:00:00Z".parse().unwrap()));
    assert!(!c.active("2026-03-29T05:59:59Z".parse().unwrap()));
    // And back in October: 08:00 CET is 07:00 UTC again.
    assert_eq!(
        c.next_boundary("2026-10-24T17:00:00Z".parse().unwrap()),
        Some("2026-10-25T07:00:00Z".parse().unwrap())
    );

    // Seconds, for windows that must start at an exact instant.
    let exact = Schedule {
        timezone: "UTC".into(),
        days: vec![],
        from: "09:00:30".into(),
        to: "09:01".into(),
    }
    .compile("e")
    .unwrap();
    assert!(!exact.active("2026-11-24T09:00:29Z".parse().unwrap()));
    assert!(exact.active("2026-11-24T09:00:30Z".parse().unwrap()));
    assert_eq!(
        exact.next_boundary("2026-11-24T09:00:00Z".parse().unwrap()),
        Some("2026-11-24T09:00:30Z".parse().unwrap())
    );

    // A window over midnight belongs to the day it starts on.
    let night = Schedule {
        timezone: "Europe/Berlin".into(),
        days: vec!["fri".into()],
        from: "22:00".into(),
        to: "06:00".into(),
    };
    let n = night.compile("n").unwrap();
    assert!(
        n.active("2026-11-27T23:30:00Z".parse().unwrap()),
        "Saturday 00:30 counts as Friday night"
    );
    assert!(
        !n.active("2026-11-28T23:30:00Z".parse().unwrap()),
        "Sunday 00:30 does not"
    );

    // The engine's wake-up for the rule set is the office-hours boundary.
    let d = decide(
        &device(),
        &rules(),
        &SignalSet::default(),
        &at_rest("home", tuesday_10() - SignedDuration::from_hours(12)),
        TIMING,
        "2026-11-24T06:30:00Z".parse().unwrap(),
    );
    assert_eq!(d.desired.as_deref(), Some("home"));
    assert_eq!(
        d.next_check,
        Some("2026-11-24T07:00:00Z".parse().unwrap()),
        "wakes at 08:00 Berlin"
    );
}

#[test]
fn bad_rules_name_the_field() {
    let cases = [
        (
            "priority: 1\npersona: x\nwhen: { schedule: { timezone: Mars/Olympus, from: '08:00', to: '09:00' } }",
            "spec.when.schedule.timezone",
        ),
        (
            "priority: 1\npersona: x\nwhen: { schedule: { timezone: UTC, from: '25:00', to: '09:00' } }",
            "spec.when.schedule.from",
        ),
        (
            "priority: 1\npersona: x\nwhen: { schedule: { timezone: UTC, from: '08:00', to: '9:00' } }",
            "spec.when.schedule.to",
        ),
        (
            "priority: 1\npersona: x\nwhen: { schedule: { timezone: UTC, from: '08:00:60', to: '09:00' } }",
            "spec.when.schedule.from",
        ),
        (
            "priority: 1\npersona: x\nwhen: { expression: 'signals.alerts.exists(' }",
            "spec.when.expression: does not parse",
        ),
        (
            "priority: 1\npersona: x\nholdUntilClear: true",
            "spec.holdUntilClear",
        ),
        (
            "priority: 1\npersona: x\nwhen: { country: {} }",
            "spec.when.country",
        ),
    ];
    for (yaml, want) in cases {
        let r: RuleSpec = serde_yaml::from_str(yaml).unwrap();
        let e = r.validate().expect_err(want).to_string();
        assert!(e.starts_with(want), "{e:?} should start with {want:?}");
    }
}

fn arb_signal() -> impl Strategy<Value = (String, i64)> {
    let kinds = prop_oneof![
        (
            0..3u8,
            prop_oneof![Just("low"), Just("high"), Just("critical")],
            any::<bool>()
        )
            .prop_map(|(id, sev, clear)| format!(
                r#"{{"device":"vm1","kind":"alert","id":"a{id}","severity":"{sev}","state":"{}"}}"#,
                if clear { "cleared" } else { "raised" }
            )),
        prop_oneof![Just("DE"), Just("FR"), Just("US")]
            .prop_map(|c| format!(r#"{{"device":"vm1","kind":"geo","country":"{c}"}}"#)),
        (prop_oneof![Just("zoom"), Just("ssh")], any::<bool>()).prop_map(|(a, on)| format!(
            r#"{{"device":"vm1","kind":"app","app":"{a}","active":{on}}}"#
        )),
        prop_oneof![Just("admin"), Just("analyst")]
            .prop_map(|r| format!(r#"{{"device":"vm1","kind":"role","role":"{r}"}}"#)),
    ];
    (kinds, 0..20i64)
}

proptest! {
    #[test]
    fn the_order_signals_arrive_in_does_not_matter(sigs in prop::collection::vec(arb_signal(), 0..12), seed in any::<u64>()) {
        let base = tuesday_10();
        let signals: Vec<Signal> = sigs.iter().map(|(j, t)| signal(j, base + SignedDuration::from_secs(*t))).collect();
        let mut shuffled = signals.clone();
        // A deterministic shuffle from the seed.
        let mut x = seed | 1;
        for i in (1..shuffled.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            shuffled.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let now = base + SignedDuration::from_secs(30);
        let hist = at_rest("office", base - SignedDuration::from_hours(1));
        let a = decide(&device(), &rules(), &set(&signals), &hist, TIMING, now);
        let b = decide(&device(), &rules(), &set(&shuffled), &hist, TIMING, now);
        prop_assert_eq!(set(&signals), set(&shuffled));
        prop_assert_eq!((a.desired, a.rule, a.shift, a.blocked_until), (b.desired, b.rule, b.shift, b.blocked_until));
    }

    #[test]
    fn no_device_shifts_more_often_than_its_dwell_time_allows(events in prop::collection::vec((arb_signal(), 1..40i64), 1..40)) {
        let mut now = tuesday_10();
        let mut signals = SignalSet::default();
        let mut hist = at_rest("office", now - SignedDuration::from_hours(1));
        let mut last_shift: Option<Timestamp> = None;
        let rs = rules();
        for ((json, _), gap) in events {
            now += SignedDuration::from_secs(gap);
            signals.merge(signal(&json, now));
            let d = decide(&device(), &rs, &signals, &hist, TIMING, now);
            if d.shift {
                let desired = d.desired.clone().unwrap();
                let urgent = d.rule.as_ref().is_some_and(|r| rs[r].immediate);
                if let Some(last) = last_shift && !urgent {
                    prop_assert!(now.duration_since(last) >= TIMING.dwell, "shifted {}s after the last one to {desired}", now.duration_since(last).as_secs());
                }
                if let Some(old) = hist.persona.take() {
                    hist.left.insert(old, now);
                }
                hist = History { persona: Some(desired), rule: d.rule, since: Some(now), left: hist.left };
                last_shift = Some(now);
            }
        }
    }

    #[test]
    fn the_engines_quick_evaluation_decides_as_the_explaining_one(
        sigs in prop::collection::vec(arb_signal(), 0..12),
        on in prop_oneof![Just("office"), Just("travel"), Just("hardened")],
        minutes in 0..600i64,
    ) {
        let base = tuesday_10();
        let signals: Vec<Signal> = sigs.iter().map(|(j, t)| signal(j, base + SignedDuration::from_secs(*t))).collect();
        let now = base + SignedDuration::from_mins(minutes);
        let hist = at_rest(on, base - SignedDuration::from_mins(minutes % 3));
        let rs = rules();
        let reference = decide(&device(), &rs, &set(&signals), &hist, TIMING, now);
        let quick = decide_with(&device(), &CompiledRules::new(&rs), &set(&signals), &hist, TIMING, now, false);
        prop_assert_eq!(
            (&quick.desired, &quick.rule, quick.shift, quick.blocked_until, &quick.why),
            (&reference.desired, &reference.rule, reference.shift, reference.blocked_until, &reference.why)
        );
        prop_assert!(quick.rules.is_empty(), "no explanation built");
        // Rules below the winner are not looked at: their schedule edges cannot change
        // the decision, so the quick one may wake later, never earlier.
        match (quick.next_check, reference.next_check) {
            (Some(q), Some(r)) => prop_assert!(q >= r),
            (q, r) => prop_assert!(q.is_none() || r.is_some(), "{:?} vs {:?}", q, r),
        }
        if reference.rule.is_none() {
            prop_assert_eq!(quick.next_check, reference.next_check);
        }
    }
}

/// One random rule's `when`, from the conditions the index reads and the ones it cannot.
fn arb_when() -> impl Strategy<Value = String> {
    let alert = prop_oneof![
        Just("alert: { minSeverity: high }"),
        Just("alert: { kind: scan }"),
        Just("alert: {}"),
    ];
    let country = prop_oneof![
        Just("country: { in: [DE, FR] }"),
        Just("country: { notIn: [DE] }")
    ];
    let schedule = prop_oneof![
        Just("schedule: { timezone: Europe/Berlin, from: '10:05', to: '10:20' }"),
        Just("schedule: { timezone: UTC, days: [tue], from: '09:10', to: '09:11' }"),
        Just("schedule: { timezone: Nowhere/Else, from: '08:00', to: '09:00' }"),
    ];
    let apps = prop_oneof![Just("apps: { anyOf: [zoom] }"), Just("apps: { anyOf: [] }")];
    let role = prop_oneof![
        Just("role: { in: [admin] }"),
        Just("role: { notIn: [admin] }")
    ];
    let expression = prop_oneof![
        Just(r#"expression: 'signals.role == "analyst"'"#),
        Just(r#"expression: '"FR" == signals.geo.country && signals.apps.size() > 0'"#),
        Just(r#"expression: 'signals.alerts.exists(a, a.severity == "critical")'"#),
        Just(r#"expression: 'now > "2026-11-24T09:00:40Z"'"#),
        Just(
            r#"expression: 'size(signals.apps) + size(signals.alerts) > 1 || device.labels.team == "research"'"#
        ),
        Just(r#"expression: 'signals.role =='"#),
    ];
    (
        prop::option::of(alert),
        prop::option::of(country),
        prop::option::of(schedule),
        prop::option::of(apps),
        prop::option::of(role),
        prop::option::of(expression),
    )
        .prop_map(|(a, c, s, p, r, e)| {
            let parts: Vec<&str> = [a, c, s, p, r, e].into_iter().flatten().collect();
            format!("{{ {} }}", parts.join(", "))
        })
}

fn arb_rules() -> impl Strategy<Value = BTreeMap<String, RuleSpec>> {
    let rule = (
        0..4i32,
        prop_oneof![
            Just("office"),
            Just("travel"),
            Just("hardened"),
            Just("media")
        ],
        prop_oneof![
            Just(""),
            Just("selector: { matchLabels: { team: finance } }")
        ],
        arb_when(),
        any::<bool>(),
        any::<bool>(),
    );
    prop::collection::vec(rule, 0..12).prop_map(|rules| {
        rules
            .into_iter()
            .enumerate()
            .map(|(i, (priority, persona, selector, when, hold, immediate))| {
                let yaml = format!(
                    "priority: {priority}\npersona: {persona}\n{selector}\nwhen: {when}\nholdUntilClear: {hold}\nimmediate: {immediate}\n"
                );
                let spec: RuleSpec =
                    serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
                (format!("r{i}"), spec)
            })
            .collect()
    })
}

/// What happens next to the device: a signal (which may expire), or a change of its
/// labels; then time moves, forward mostly, sometimes back.
fn arb_step() -> impl Strategy<Value = (Option<(String, Option<u64>)>, bool, i64)> {
    let signal = prop_oneof![
        arb_signal().prop_map(|(j, _)| j),
        (0..3u8, any::<bool>()).prop_map(|(id, clear)| format!(
            r#"{{"device":"vm1","kind":"alert","id":"s{id}","severity":"low","alertKind":"scan","state":"{}"}}"#,
            if clear { "cleared" } else { "raised" }
        )),
    ];
    (
        prop::option::of((signal, prop::option::of(1..90u64))),
        prop::bool::weighted(0.1),
        prop_oneof![8 => 0..400i64, 1 => -300..0i64],
    )
}

proptest! {
    #[test]
    fn incremental_evaluation_decides_as_the_reference(
        rs in arb_rules(),
        steps in prop::collection::vec(arb_step(), 1..30),
    ) {
        let compiled = CompiledRules::new(&rs);
        let mut now = tuesday_10();
        let mut signals = SignalSet::default();
        let mut dev = device();
        let mut hist = at_rest("office", now - SignedDuration::from_mins(5));
        let mut memo = None;
        for (signal_step, relabel, gap) in steps {
            if let Some((json, ttl)) = signal_step {
                let mut s = self::signal(&json, now);
                s.ttl = ttl;
                signals.merge(s);
            }
            if relabel {
                let team = if dev.spec.labels["team"] == "finance" { "research" } else { "finance" };
                std::sync::Arc::make_mut(&mut dev.spec).labels.insert("team".into(), team.into());
            }
            let quick = decide_with(&dev, &compiled, &signals, &hist, TIMING, now, false);
            let reference = decide(&dev, &rs, &signals, &hist, TIMING, now);
            let inc = decide_incremental(&dev, &compiled, &signals, &hist, TIMING, now, &mut memo);
            prop_assert_eq!(
                (&inc.desired, &inc.rule, inc.shift, inc.blocked_until, &inc.why, inc.next_check),
                (&quick.desired, &quick.rule, quick.shift, quick.blocked_until, &quick.why, quick.next_check)
            );
            prop_assert_eq!(
                (&inc.desired, &inc.rule, inc.shift, inc.blocked_until),
                (&reference.desired, &reference.rule, reference.shift, reference.blocked_until)
            );
            if inc.shift {
                if let Some(old) = hist.persona.take() {
                    hist.left.insert(old, now);
                }
                hist = History { persona: inc.desired, rule: inc.rule, since: Some(now), left: hist.left };
            }
            now += SignedDuration::from_secs(gap);
        }
    }
}

#[test]
fn expired_signals_are_pruned_and_decisions_do_not_change() {
    let now = tuesday_10();
    let mut signals = SignalSet::default();
    let mut geo = signal(r#"{"device":"vm1","kind":"geo","country":"FR"}"#, now);
    geo.ttl = Some(60);
    signals.merge(geo);
    signals.merge(signal(
        r#"{"device":"vm1","kind":"role","role":"admin"}"#,
        now,
    ));
    let later = now + SignedDuration::from_secs(61);
    let hist = at_rest("office", now - SignedDuration::from_hours(1));
    let before = decide(&device(), &rules(), &signals, &hist, TIMING, later);
    assert_eq!(
        signals.prune(now),
        Vec::<String>::new(),
        "nothing expired yet"
    );
    assert_eq!(signals.prune(later), vec!["vm1/geo".to_owned()]);
    assert_eq!(signals.all().count(), 1, "the role stays");
    let after = decide(&device(), &rules(), &signals, &hist, TIMING, later);
    assert_eq!(
        (before.desired, before.rule, before.shift),
        (after.desired, after.rule, after.shift)
    );
}

#[test]
fn a_part_changes_with_its_signals_and_with_an_expiry_in_between() {
    let t = tuesday_10();
    let secs = |s: i64| t + SignedDuration::from_secs(s);
    let mut signals = SignalSet::default();
    assert_eq!(signals.of("vm1").revisions(), [0; 4], "no signal yet");
    let none = signals.of("vm1").revisions();
    assert!(signals.merge(signal(
        r#"{"device":"vm1","kind":"role","role":"admin"}"#,
        t
    )));
    let role = signals.of("vm1").revisions();
    assert_eq!(
        signals.of("vm1").changed_since(&none, t, t),
        Some([false, false, false, true]),
        "alerts, apps, geo, role: only the role"
    );
    assert!(
        !signals.merge(signal(
            r#"{"device":"vm1","kind":"role","role":"guest"}"#,
            secs(-5)
        )),
        "an older signal changes nothing"
    );
    assert_eq!(signals.of("vm1").revisions(), role);
    let mut geo = signal(r#"{"device":"vm1","kind":"geo","country":"FR"}"#, t);
    geo.ttl = Some(60);
    assert!(signals.merge(geo));
    let both = signals.of("vm1").revisions();
    let mine = signals.of("vm1");
    assert_eq!(mine.changed_since(&both, t, secs(59)), Some([false; 4]));
    assert_eq!(
        mine.changed_since(&both, t, secs(60)),
        Some([false, false, true, false]),
        "the geo expired in between"
    );
    assert_eq!(
        mine.changed_since(&both, secs(61), secs(90)),
        Some([false; 4]),
        "it had expired before"
    );
    assert_eq!(
        mine.changed_since(&both, secs(10), t),
        None,
        "the clock went back"
    );
    assert_eq!(signals.prune(secs(60)), vec!["vm1/geo".to_owned()]);
    assert_eq!(
        signals.of("vm1").changed_since(&both, secs(60), secs(60)),
        Some([true; 4]),
        "pruning counts as a change"
    );
    assert_eq!(
        signals.of("vm2").changed_since(&[0; 4], t, t),
        Some([false; 4])
    );
}
