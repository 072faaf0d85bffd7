//! Interface names to indexes through one kept socket: `if_nametoindex` opens and
//! closes a socket per call, and a shift asks once.
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

/// Answers for the network namespace its thread was in when it was made.
pub struct Names(Option<OwnedFd>);

impl Names {
    pub fn new() -> Self {
        // SAFETY: a plain datagram socket, owned from here on.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        Self((fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn index(&self, name: &str) -> Option<u32> {
        let Some(sock) = &self.0 else {
            return super::ifindex(name).ok();
        };
        if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
            return None;
        }
        // SAFETY: all zeroes is a valid `ifreq`.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *to = *from as libc::c_char;
        }
        // SAFETY: SIOCGIFINDEX reads the name and writes the index into `req`, which
        // lives across the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX, &mut req) };
        if rc != 0 {
            return None;
        }
        // SAFETY: the kernel wrote the index member.
        Some(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_if_nametoindex_does() {
        let names = Names::new();
        assert_eq!(names.index("lo"), super::super::ifindex("lo").ok());
        assert_eq!(names.index("lo"), Some(1));
        assert_eq!(names.index("persona-none0"), None);
        assert_eq!(names.index("a-name-far-too-long-for-linux"), None);
        assert_eq!(names.index("lo\0x"), None);
    }
}
