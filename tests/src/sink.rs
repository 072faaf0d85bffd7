//! `sink.py` on the outside: what arrived of each upload, summed where it landed.
use std::{
    io::{BufRead as _, BufReader, Lines},
    process::{Child, ChildStdout, Command, Stdio},
};

use crate::lab::script;

pub struct Sink {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

/// One upload as the receiver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub sha256: String,
    pub bytes: u64,
    /// The sender's address (IPv4 as `::ffff:a.b.c.d`).
    pub from: String,
}

impl Upload {
    pub fn new(sha256: &str, bytes: u64, from: &str) -> Self {
        Self {
            sha256: sha256.to_owned(),
            bytes,
            from: from.to_owned(),
        }
    }
}

impl Sink {
    /// TCP on `port` (IPv4 and IPv6) in the namespace `ns`, for four minutes at most.
    pub fn start(ns: &str, port: u16) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "python3"])
            .arg(script("sink.py"))
            .args([port.to_string().as_str(), "240"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting sink.py");
        let lines = BufReader::new(child.stdout.take().expect("sink stdout")).lines();
        crate::lab::wait_until("the sink listens", || {
            crate::netns::try_sh(&format!(
                "ip netns exec {ns} ss -ltnH 'sport = :{port}' | grep -q LISTEN"
            ))
            .status
            .success()
        });
        Self { child, lines }
    }

    pub fn next_upload(&mut self) -> Upload {
        let line = self
            .lines
            .next()
            .expect("the sink stopped before an upload arrived")
            .expect("reading the sink");
        let f: Vec<&str> = line.split_whitespace().collect();
        let [_, sha, bytes, from] = f[..] else {
            panic!("sink line {line:?}");
        };
        Upload::new(sha, bytes.parse().expect("byte count"), from)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
