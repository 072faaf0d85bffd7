//! The machine the figures came from, and BENCHMARKS.md from the raw results.
use std::fmt::Write as _;

use serde_json::{Value, json};

pub fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let mem_kb: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    json!({
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": mem_kb as f64 / 1024.0 / 1024.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
    })
}

fn f(v: &Value, digits: usize) -> String {
    v.as_f64()
        .map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// Programs' mean run times on real traffic, e.g. "from_vm 930, to_vm 880".
/// Microsecond percentiles as "p50 / p99 (max)".
fn pct(v: &Value) -> String {
    format!(
        "{} / {} ({})",
        f(&v["p50_us"], 1),
        f(&v["p99_us"], 1),
        f(&v["max_us"], 1)
    )
}

fn in_situ(programs: &Value) -> String {
    let each: Vec<String> = programs
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, p)| {
            format!(
                "{} {}",
                name.trim_start_matches("persona_"),
                f(&p["ns_per_run"], 0)
            )
        })
        .collect();
    if each.is_empty() {
        "-".into()
    } else {
        each.join(", ")
    }
}

/// Rows of shifts through the API: `first` (what differs between rows), shifts/s, p50
/// and p99, and p50 as a multiple of `base` (microseconds).
fn shift_rows(m: &mut String, rows: &Value, first: &str, base: f64) {
    for row in rows.as_array().into_iter().flatten() {
        let l = &row["latency"];
        let _ = writeln!(
            m,
            "| {} | {} | {} | {} | {:.2}x |",
            row[first],
            f(&row["shifts_per_s"], 0),
            f(&l["p50_us"], 0),
            f(&l["p99_us"], 0),
            l["p50_us"].as_f64().unwrap_or(f64::NAN) / base
        );
    }
}

pub fn markdown(r: &Value) -> String {
    let mut m = String::new();
    let mac = &r["machine"];
    let _ = writeln!(
        m,
        "# Benchmarks\n\nWritten by `cargo xtask bench` on {} ({}, {} CPUs, {:.0} GiB, Linux {}). Raw results: `benchmarks.json`. These machines are shared and noisy: compare the ratios and the growth within one run, not the absolute figures between runs.\n",
        r["date"].as_str().unwrap_or("?"),
        mac["cpu"].as_str().unwrap_or("?"),
        mac["cpus"],
        mac["memory_gib"].as_f64().unwrap_or(0.0),
        mac["kernel"].as_str().unwrap_or("?"),
    );
    if let Some(p) = r.get("packets") {
        let _ = writeln!(
            m,
            "## Per-packet cost\n\nBPF_PROG_TEST_RUN, repeat {} per figure, the kernel's time per run. Both directions run in tc (tcx ingress and egress of the tap); next to each case, on the same frame just before it, a tc program that only returns TC_ACT_OK and one that does a single hash lookup (the device's ACTIVE entry) first. The rules are per direction and family, each on its own prefix. With repeat > 1 the kernel reruns a program on the frame it rewrote, so after one run a translated frame would be a spoofing drop: the measured persona uses the VM's own addresses, which makes every rewrite write the bytes already there (same instructions, same frame next run). Each case then checks from the counters that every run took the named path (`runs_on_path` in the JSON).\n\n| case | rules | ns | TC_ACT_OK ns | one lookup ns | x TC_ACT_OK | x one lookup |\n|---|---:|---:|---:|---:|---:|---:|",
            p["repeat"]
        );
        for row in p["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {}x | {}x |",
                row["case"].as_str().unwrap_or(""),
                row["rules"],
                f(&row["ns"], 1),
                f(&row["tc_pass_ns"], 1),
                f(&row["tc_lookup_ns"], 1),
                f(&row["ratio_to_pass"], 2),
                f(&row["ratio_to_lookup"], 2)
            );
        }
        m.push('\n');
    }
    if let Some(s) = r.get("shifts") {
        let _ = writeln!(
            m,
            "## Shift latency\n\nMicroseconds, p50 / p99 (max). *flip*: the one ACTIVE map update that makes a shift visible. *compile+stage+flip*: the library call, persona text to flipped datapath (includes the batched reclamation of replaced tables). *API*: POST /trigger_shift over the daemon's Unix socket, one kept-alive connection, until it returns after the flip (client wall clock; includes plan, audit record and store write). *fsync*: the disk's own, where the daemon's store lives (4 KiB written, fdatasync), measured just before the API calls: every acknowledged shift waits for one. *API, store on tmpfs*: the same calls to a daemon whose data directory is on tmpfs, where fsync returns at once: what a shift costs but for the disk (a bench figure only; a daemon's store belongs on a disk). *nft -f*: replacing an equivalent nftables ruleset (DNAT, SNAT, one filter rule per prefix) atomically, wall clock of the `nft -f` process.\n\n| rules | flip | compile+stage+flip | API | fsync | API p50 × fsync p50 | API, store on tmpfs | nft -f |\n|---:|---|---|---|---|---:|---|---|"
        );
        for row in s["rows"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {:.2}x | {} | {} |",
                row["rules"],
                pct(&row["flip"]),
                pct(&row["compile_stage_flip"]),
                pct(&row["api_call"]),
                pct(&row["fsync"]),
                row["api_call"]["p50_us"].as_f64().unwrap_or(f64::NAN)
                    / row["fsync"]["p50_us"].as_f64().unwrap_or(f64::NAN),
                pct(&row["api_call_store_in_memory"]),
                pct(&row["nft_f"])
            );
        }
        m.push('\n');
    }
    if let Some(fl) = r.get("flows") {
        let ratio = |what: &str, q: &str| {
            let busy = fl["busy"][what][q].as_f64().unwrap_or(0.0);
            let idle = fl["idle"][what][q].as_f64().unwrap_or(1.0);
            format!("{:.2}x", busy / idle)
        };
        let _ = writeln!(
            m,
            "## Shifts that keep open flows\n\nMicroseconds, p50 / p99 (max), {} keep-mode shifts between two personas of one device (BPF_PROG_TEST_RUN datapath, no host wiring) with {} open UDP flows, and on an idle device. A flow keeps its address by what its conntrack entry holds, so the flip does no per-flow work.\n\n| device | flip | compile+stage+flip |\n|---|---|---|\n| idle | {} | {} |\n| {} open flows | {} | {} |\n| ratio (p50) | {} | {} |\n",
            fl["busy"]["flip"]["n"],
            fl["busy"]["flows"],
            pct(&fl["idle"]["flip"]),
            pct(&fl["idle"]["compile_stage_flip"]),
            fl["busy"]["flows"],
            pct(&fl["busy"]["flip"]),
            pct(&fl["busy"]["compile_stage_flip"]),
            ratio("flip", "p50_us"),
            ratio("compile_stage_flip", "p50_us"),
        );
        let rel = &fl["release"]["release"];
        let _ = writeln!(
            m,
            "A kept TCP connection through the daemon closes (both FINs): its address is withdrawn from the host after {} ms p50, {} ms max over {} rounds (the daemon sweeps connection tracking each second).\n",
            f(&(rel["p50_us"].as_f64().unwrap_or(0.0) / 1000.0).into(), 0),
            f(&(rel["max_us"].as_f64().unwrap_or(0.0) / 1000.0).into(), 0),
            fl["release"]["rounds"]
        );
    }
    if let Some(l) = r.get("lifecycle") {
        let ms = |v: &Value, q: &str| f(&(v[q].as_f64().unwrap_or(0.0) / 1000.0).into(), 1);
        let row = |name: &str, v: &Value| {
            format!(
                "| {name} | {} | {} | {:.2}x |",
                ms(v, "p50_us"),
                ms(v, "p99_us"),
                v["p50_us"].as_f64().unwrap_or(0.0)
                    / l["api_shift"]["p50_us"].as_f64().unwrap_or(1.0)
            )
        };
        let _ = writeln!(
            m,
            "## A VM's interface coming back

The daemon following link events, {} rounds: the VM's veth deleted and made again, then timed from the start of `ip link set up` (the command's own time is the first row) to the device's programs attached under the new ifindex (its link pin there) and to its persona active again (`/status` polled). An API shift of the same device is the baseline.

| from `ip link set up` to | p50 ms | p99 ms | × API shift (p50) |
|---|---:|---:|---:|
{}
{}
{}
{}
",
            l["rounds"],
            row("the command returning", &l["link_up_command"]),
            row("programs attached (guarded)", &l["appear_to_guarded"]),
            row("persona active", &l["appear_to_persona"]),
            row("(an API shift)", &l["api_shift"]),
        );
    }
    if let Some(t) = r.get("throughput") {
        let _ = writeln!(
            m,
            "## Throughput through namespaces\n\niperf3 from the VM namespace to the outside one through the host namespace, {} s each, every setup measured {} times round-robin (medians): TCP bulk, and UDP with 18-byte payloads (64-byte frames) at full rate, counted where they arrive. *no program*: plain routing. *persona*: the daemon with the examples' office persona, the host's stack forwarding. *persona, BPF routing*: the same with `--host-routing bpf` (a FIB lookup and a redirect in the programs). *persona + flood guard*: with the device's XDP flood guard on. *nftables*: the same persona as nftables NAT and filter rules. Between namespaces the VM's link is a veth: with only tc programs on it, it carries 64 KB GSO segments, so TCP bulk pays per segment, not per packet; attaching any XDP program (the flood guard) makes the kernel take GSO away from the veth's peer, so bulk TCP pays per MTU frame. *In situ* is each program's mean run time on the real traffic of those rounds (kernel.bpf_stats_enabled).\n\n| setup | TCP Gbit/s | × no program | × nftables | small UDP pkt/s | × no program | × nftables | UDP lost % | in situ ns per run |\n|---|---:|---:|---:|---:|---:|---:|---:|---|",
            t["seconds_each"], t["rounds"]
        );
        let rows: Vec<&Value> = t["rows"].as_array().into_iter().flatten().collect();
        let of = |setup: &str, key: &str| {
            rows.iter()
                .find(|r| r["setup"] == setup)
                .and_then(|r| r[key].as_f64())
        };
        let ratio = |row: &Value, key: &str, base: &str| match (row[key].as_f64(), of(base, key)) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:.2}", v / b),
            _ => "-".into(),
        };
        for row in &rows {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row["setup"].as_str().unwrap_or(""),
                row["tcp_bits_per_s"]
                    .as_f64()
                    .map_or("-".into(), |b| format!("{:.2}", b / 1e9)),
                ratio(row, "tcp_bits_per_s", "no program"),
                ratio(row, "tcp_bits_per_s", "nftables"),
                f(&row["udp_small_pps_received"], 0),
                ratio(row, "udp_small_pps_received", "no program"),
                ratio(row, "udp_small_pps_received", "nftables"),
                f(&row["udp_small_lost_percent"], 1),
                in_situ(&row["programs"])
            );
        }
        m.push('\n');
        let _ = writeln!(
            m,
            "A spoofed flood: the VM sends UDP from an address that is not its own, as fast as `hping3 --flood` can for {} s. Dropped per second as counted under `drop_spoofed`, and the mean run time of the programs that saw the flood: tc drops it after the kernel built an skb, the flood guard before.\n\n| setup | sent pkt/s | dropped pkt/s | in situ ns per run |\n|---|---:|---:|---|",
            t["seconds_each"]
        );
        for row in t["spoofed_flood"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                row["setup"].as_str().unwrap_or(""),
                f(&row["sent_pps"], 0),
                f(&row["dropped_pps"], 0),
                in_situ(&row["programs"])
            );
        }
        m.push('\n');
    }
    if let Some(c) = r.get("control") {
        let fs = &c["fsync"];
        let _ = writeln!(
            m,
            "## Control plane\n\nThrough the daemon's Unix socket, each client on one kept-alive connection, its requests serialized before the clock starts and each answer checked for its status. Every acknowledged shift and signal batch is on disk first: the disk's own fsync (4 KiB written, fdatasync) here is **{} / {} us** p50 / p99, the floor of a single client's latency.\n\nShifts (a device alternating between two personas; with more clients, each on a device of its own):\n\n| clients | shifts/s | p50 us | p99 us | p50 × fsync p50 |\n|---:|---:|---:|---:|---:|",
            f(&fs["p50_us"], 0),
            f(&fs["p99_us"], 0)
        );
        let fsync = fs["p50_us"].as_f64().unwrap_or(f64::NAN);
        shift_rows(&mut m, &c["shifts"], "clients", fsync);
        let _ = writeln!(
            m,
            "\nContext signals through the rule engine (one rule in ten a CEL expression; none matches, so every rule is evaluated and nothing shifts), per POST /context. Each case first sends 5 POSTs per client, measured apart (*first POSTs*: they meet devices the engine has not decided for since they were written), then the steady run the rate is taken from:\n\n| rules | devices | clients | batch | signals/s | POST p50 us | POST p99 us | first POSTs p50 us |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for row in c["context"].as_array().into_iter().flatten() {
            let l = &row["post_latency"];
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                row["rules"],
                row["devices"],
                row["clients"],
                row["batch"],
                f(&row["signals_per_s"], 0),
                f(&l["p50_us"], 0),
                f(&l["p99_us"], 0),
                f(&row["first_post_latency"]["p50_us"], 0)
            );
        }
        let ss = &c["signal_shifts"];
        let _ = writeln!(
            m,
            "\nSignals that shift (10,000 rules; d0's role alternates between one a rule asks for and one none does, so each signal moves it): the POST returns after the flip, **{} / {} us** p50 / p99 over {} signals; the daemon's own signal-to-flip histogram (`persona_signal_to_flip_seconds`, bounds at 100, 150, 200 and 250 us, every 100 us from 300 us to 1 ms, every 250 us to 2 ms) says **{} us** on average over {} flips, p50 at most **{} us** and p99 at most **{} us**.",
            f(&ss["post_latency"]["p50_us"], 0),
            f(&ss["post_latency"]["p99_us"], 0),
            ss["posts"],
            f(&ss["mean_signal_to_flip_us"], 0),
            ss["flips"],
            f(&ss["signal_to_flip_p50_at_most_us"], 0),
            f(&ss["signal_to_flip_p99_at_most_us"], 0)
        );
        m.push('\n');
    }
    if let Some(c) = r.get("crowd") {
        let _ = writeln!(
            m,
            "## Shifts among thousands of devices\n\nOne device shifted back and forth through the API (one client, {} shifts), with 8 devices attached and then with {} more applied and attached in the same daemon (taps, each device on a persona of its own: {:.1} s to apply and attach them). A shift checks that no other device holds the addresses it takes.\n\n| devices | shifts/s | p50 us | p99 us | p50 × the 8 devices' |\n|---:|---:|---:|---:|---:|",
            c["rows"][0]["shifts"],
            c["applied"],
            c["apply_s"].as_f64().unwrap_or(f64::NAN)
        );
        let base = c["rows"][0]["latency"]["p50_us"]
            .as_f64()
            .unwrap_or(f64::NAN);
        shift_rows(&mut m, &c["rows"], "devices", base);
        m.push('\n');
    }
    if let Some(s) = r.get("scale") {
        let d = &s["devices"];
        let _ = writeln!(
            m,
            "## Scale\n\n{} tap devices in one namespace, each attached (tcx ingress and egress, host routes) and shifted to a persona of its own. Per-device cost of the devices added since the previous row:\n\n| devices | attach us each | stage+shift us each | flip us (last) |\n|---:|---:|---:|---:|",
            d["devices"]
        );
        for st in d["steps"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                st["devices"],
                f(&st["attach_us_each"], 0),
                f(&st["stage_shift_us_each"], 0),
                f(&st["last_flip_us"], 1)
            );
        }
        let (empty, full) = (
            d["map_memory_bytes_empty"].as_f64().unwrap_or(0.0),
            d["map_memory_bytes_full"].as_f64().unwrap_or(0.0),
        );
        let _ = writeln!(
            m,
            "\nMaps' memory (bytes_memlock, as the kernel accounts it): {:.1} MiB with no device, {:.1} MiB with {} devices and personas, so {:.0} bytes per device with its persona beyond the preallocated maps. By map: `benchmarks.json` (`scale.devices.map_memory_by_map`).\n",
            empty / 1048576.0,
            full / 1048576.0,
            d["devices"],
            (full - empty) / d["devices"].as_f64().unwrap_or(1.0)
        );
        let after = d["map_memory_bytes_after_rounds"].as_f64().unwrap_or(0.0);
        let pairs = d["round_shifts"].as_f64().unwrap_or(1.0);
        let _ = writeln!(
            m,
            "Then every device through {} more personas of its own: {} shifts, {} device-persona pairs, in {} s, no map full (a pair's counter keys are folded and freed once no table counts for it). Memory after: {:.1} MiB, {:.0} bytes per further pair (no traffic ran here, so nothing was counted or folded: the packet test of one device through 2,000 personas covers folding). A scrape's read of every device's counters (one batched pass over COUNTERS, TRACKED, PERSONAS and HANDSHAKES): **{} ms** at {} devices on one persona each, **{} ms** after the rounds. Map fill after the rounds:\n\n| map | used | capacity |\n|---|---:|---:|",
            d["rounds"],
            d["round_shifts"],
            d["round_shifts"],
            f(&d["rounds_s"], 1),
            after / 1048576.0,
            (after - full) / pairs,
            f(&d["scrape_ms_one_persona"], 1),
            d["devices"],
            f(&d["scrape_ms_after_rounds"], 1),
        );
        for e in d["map_entries"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} |",
                e["map"].as_str().unwrap_or(""),
                e["used"],
                e["capacity"]
            );
        }
        m.push('\n');
        let st = &s["store"];
        let _ = writeln!(
            m,
            "Personas stored in the embedded store (redb, one durable transaction each, one writer after another):\n\n| personas | put us each | list all ms | file bytes |\n|---:|---:|---:|---:|"
        );
        for row in st["steps"].as_array().into_iter().flatten() {
            let _ = writeln!(
                m,
                "| {} | {} | {} | {} |",
                row["personas"],
                f(&row["put_us_each_since_last"], 0),
                f(&row["list_all_ms"], 1),
                row["file_bytes"]
            );
        }
    }
    if let Some(fl) = r.get("fleet") {
        fleet(&mut m, fl);
    }
    m
}

fn fleet(m: &mut String, fl: &Value) {
    let lat = |v: &Value| format!("{} / {}", f(&v["p50_us"], 0), f(&v["p99_us"], 0));
    let (local, remote) = (&fl["shift_local"], &fl["shift_remote"]);
    let ratio = remote["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN)
        / local["latency"]["p50_us"].as_f64().unwrap_or(f64::NAN);
    let _ = writeln!(
        m,
        "## Fleet on etcd\n\nThree hosts (daemons) on three etcd 3.4 members in namespaces of this machine, etcd's data on tmpfs (as in the tests). Shifts of the device on host B through the API, one client, {} each way; p50 / p99 us:\n\n| asked of | latency | shifts/s |\n|---|---|---:|\n| B, its own host | {} | {} |\n| A, another host (request and answer through etcd) | {} | {} |\n\nThrough another host: **{:.1}×** the p50 of a shift asked of its own host.\n",
        local["latency"]["n"],
        lat(&local["latency"]),
        f(&local["shifts_per_s"], 0),
        lat(&remote["latency"]),
        f(&remote["shifts_per_s"], 0),
        ratio
    );
    let p = &fl["personas"];
    let _ = writeln!(
        m,
        "etcd's database grows **{} bytes per persona** ({} personas, each with a firewall rule, applied in {} s; in use: {} bytes each).\n",
        f(&p["db_bytes"], 0),
        p["personas"],
        f(&p["apply_s"], 1),
        f(&p["db_in_use_bytes"], 0)
    );
    let _ = writeln!(
        m,
        "A persona updated through A (PUT), until B and C both read the new version, 50 times; with 3 × N devices defined (none running, so no shift follows), p50 / p99 us. *Sync*: host C restarted, from its start to ready (etcd listed in pages of 1,000 keys, every device read). Devices are created through each host's own API, the three hosts at once.\n\n| devices | PUT | seen everywhere | sync s | creates/s | db bytes per device | db MiB | C's RSS MiB |\n|---|---|---|---:|---:|---:|---:|---:|"
    );
    let few = &fl["fan_out"];
    let _ = writeln!(
        m,
        "| 1 | {} | {} | - | - | - | - | - |",
        lat(&few["put"]),
        lat(&few["seen_everywhere"])
    );
    for row in fl["scale"].as_array().into_iter().flatten() {
        let _ = writeln!(
            m,
            "| 3 × {} | {} | {} | {} | {} | {} | {} | {} |",
            row["devices_per_host"],
            lat(&row["fan_out"]["put"]),
            lat(&row["fan_out"]["seen_everywhere"]),
            f(&row["sync_s"], 2),
            f(&row["creates_per_s"], 0),
            f(&row["db_bytes_per_device"], 0),
            f(
                &(row["db_bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0).into(),
                1
            ),
            f(
                &(row["rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0).into(),
                0
            )
        );
    }
}
