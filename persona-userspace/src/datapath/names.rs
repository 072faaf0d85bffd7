//! Questions about one interface by name, through one kept socket: `if_nametoindex`
//! opens and closes a socket per call, and `getifaddrs` lists every interface.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// Answers for the network namespace its thread was in when it was made.
pub struct Names(Result<OwnedFd, i32>);

impl Names {
    pub fn new() -> Self {
        // SAFETY: a plain datagram socket, owned from here on.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        Self(match fd {
            ..0 => Err(io::Error::last_os_error().raw_os_error().unwrap_or(0)),
            // SAFETY: the socket just made, owned by nothing else.
            _ => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        })
    }

    pub fn index(&self, name: &str) -> Option<u32> {
        if self.0.is_err() {
            return super::ifindex(name).ok();
        }
        let req = self.ask(name, libc::SIOCGIFINDEX).ok()?;
        // SAFETY: the kernel wrote the index member.
        Some(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
    }

    /// The interface's Ethernet address; an error for one without (the loopback, a
    /// tunnel).
    pub fn mac(&self, name: &str) -> io::Result<[u8; 6]> {
        let req = self.ask(name, libc::SIOCGIFHWADDR)?;
        // SAFETY: the kernel wrote the hardware address member.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        if hw.sa_family != libc::ARPHRD_ETHER {
            return Err(io::Error::other(format!("{name} has no Ethernet address")));
        }
        let mut mac = [0u8; 6];
        for (to, from) in mac.iter_mut().zip(hw.sa_data) {
            *to = from as u8;
        }
        Ok(mac)
    }

    /// One `ifreq` request naming the interface, as the kernel answered it.
    fn ask(&self, name: &str, request: libc::c_ulong) -> io::Result<libc::ifreq> {
        let sock = self
            .0
            .as_ref()
            .map_err(|&e| io::Error::from_raw_os_error(e))?;
        if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
            return Err(io::Error::other(format!("{name:?} is no interface name")));
        }
        // SAFETY: all zeroes is a valid `ifreq`.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (to, from) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *to = *from as libc::c_char;
        }
        // SAFETY: the SIOCGIF* requests read the name and write their answer into `req`,
        // which lives across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), request, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(req)
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
