//! tcpdump in a namespace: started before the traffic, stopped after it.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Child, Command, Stdio},
    time::Duration,
};

pub struct Capture(Child);

impl Capture {
    /// Returns once tcpdump listens on `iface` in the namespace `ns`; it stops by itself
    /// after a minute at most.
    pub fn start(ns: &str, iface: &str, filter: &str) -> Self {
        let mut capture = Self(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .args(["timeout", "60", "tcpdump", "-n", "-l", "-i", iface, filter])
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
        panic!("tcpdump never listened on {iface} in {ns}");
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
