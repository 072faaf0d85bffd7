//! tcpdump in a namespace: started before the traffic, stopped after it.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Capture(Child);

/// What tcpdump found in a capture file: packets, and those whose IPv4 header, TCP or
/// UDP checksum it computed as wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksums {
    pub packets: usize,
    pub bad: usize,
}

/// Reads the packets of a whole-packet capture that match `filter` with `tcpdump -vv`,
/// which verifies every checksum.
pub fn checksums(file: &Path, filter: &str) -> Checksums {
    let read = |verbose: &str| {
        let out = Command::new("tcpdump")
            .args(["-n", verbose, "-r"])
            .arg(file)
            .arg(filter)
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let packets = read("-q").lines().count();
    let bad = read("-vv")
        .lines()
        // TCP: "cksum 0x.. (incorrect -> 0x..)"; IPv4 header: "bad cksum";
        // UDP: "bad udp cksum".
        .filter(|l| {
            l.contains("incorrect") || l.contains("bad cksum") || l.contains("bad udp cksum")
        })
        .count();
    Checksums { packets, bad }
}

impl Capture {
    /// Returns once tcpdump listens on `iface` in the namespace `ns`; it stops by itself
    /// after two minutes at most.
    pub fn start(ns: &str, iface: &str, filter: &str) -> Self {
        Self::spawn(ns, &["-l", "-i", iface, filter])
    }

    /// Whole packets that `iface` sends into `file`, for [`checksums`]. Only those it
    /// sends: what arrives may carry the sender's partial checksums.
    pub fn sent_to_file(ns: &str, iface: &str, filter: &str, file: &Path) -> Self {
        let file = file.to_string_lossy();
        Self::spawn(
            ns,
            &[
                // A 32 MiB ring: a 20 MiB upload's segments, written whole, outrun
                // the default 2 MiB one on a busy machine.
                "-U", "-s", "0", "-B", "32768", "-Q", "out", "-w", &file, "-i", iface, filter,
            ],
        )
    }

    fn spawn(ns: &str, args: &[&str]) -> Self {
        let mut capture = Self(
            Command::new("ip")
                .args(["netns", "exec", ns])
                // Immediate mode: otherwise packets wait in the ring for its block
                // timeout, and a capture stopped sooner loses its last ones.
                .args(["timeout", "120", "tcpdump", "-n", "--immediate-mode"])
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("tcpdump"),
        );
        let mut err = BufReader::new(capture.0.stderr.take().unwrap());
        let mut line = String::new();
        while err.read_line(&mut line).expect("tcpdump stderr") > 0 {
            if line.contains("listening on") {
                return capture;
            }
            line.clear();
        }
        panic!("tcpdump {args:?} never listened in {ns}");
    }

    /// Every packet line tcpdump printed, once the last packets have landed.
    pub fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let mut text = String::new();
        self.0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let _ = self.0.wait();
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
