//! Private keys named by personas (`tls.keyFile`, `vpn.wireguard.privateKeyFile`) are
//! read from one directory only, as root reads nothing else on an API caller's word:
//! no path out of it, no symbolic link leading out, no file that anyone but root owns
//! or may read. What a refusal says is about the file named, never about another.
use std::{
    io::Read as _,
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, OpenHow, ResolveFlag, open, openat2},
    sys::stat::Mode,
};

pub const DEFAULT_KEY_DIR: &str = "/etc/persona/keys";

/// Larger than any PEM or WireGuard key.
const MAX_KEY_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDir(PathBuf);

impl Default for KeyDir {
    fn default() -> Self {
        Self(DEFAULT_KEY_DIR.into())
    }
}

impl KeyDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The key file `name` (relative to the directory, or absolute inside it), read as
    /// root; the error is the reason alone, for the caller to put under its field.
    pub fn read(&self, name: &Path) -> Result<Vec<u8>, String> {
        let outside = || format!("must name a file in the key directory {}", self.0.display());
        let relative = if name.is_absolute() {
            name.strip_prefix(&self.0).map_err(|_| outside())?
        } else {
            name
        };
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(outside());
        }
        let dir = open(
            &self.0,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("the key directory {}: {e}", self.0.display()))?;
        // Whoever may write in it could link root's other files in.
        let held = nix::sys::stat::fstat(&dir)
            .map_err(|e| format!("the key directory {}: {e}", self.0.display()))?;
        if held.st_uid != 0 || held.st_mode & 0o022 != 0 {
            return Err(format!(
                "the key directory {} must be root's and writable by root alone",
                self.0.display()
            ));
        }
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        let fd = openat2(dir.as_fd(), relative, how).map_err(|e| match e {
            Errno::ENOENT | Errno::ENOTDIR => "no such file in the key directory".to_owned(),
            Errno::EXDEV | Errno::ELOOP => "a link that leads out of the key directory".to_owned(),
            e => format!("cannot be opened: {}", e.desc()),
        })?;
        let file = std::fs::File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot be read: {e}"))?;
        if !meta.is_file() {
            return Err("is not a regular file".into());
        }
        if meta.uid() != 0 {
            return Err(format!("is owned by uid {}, not root", meta.uid()));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "has mode {:04o}: others may read it; 0600 or stricter",
                meta.mode() & 0o7777
            ));
        }
        let mut bytes = Vec::with_capacity(meta.len().min(MAX_KEY_BYTES) as usize);
        file.take(MAX_KEY_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot be read: {e}"))?;
        if bytes.len() as u64 > MAX_KEY_BYTES {
            return Err("is larger than a key".into());
        }
        Ok(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _, symlink};

    use super::*;

    /// A key file as the tests need it: `bytes`, made anew with exactly `mode`.
    pub(crate) fn put_key(path: &Path, bytes: &[u8], mode: u32) {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn put(path: &Path, mode: u32) {
        put_key(path, b"secret", mode);
    }

    #[test]
    fn only_root_owned_private_files_inside_the_directory_are_read() {
        let base = std::env::temp_dir().join(format!("persona-keydir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let dir = base.join("keys");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let keys = KeyDir::new(&dir);
        put(&dir.join("ok.key"), 0o600);
        put(&dir.join("sub/ok.key"), 0o400);
        put(&dir.join("loose.key"), 0o644);
        put(&dir.join("theirs.key"), 0o600);
        nix::unistd::chown(
            &dir.join("theirs.key"),
            Some(nix::unistd::Uid::from_raw(65534)),
            None,
        )
        .unwrap();
        put(&base.join("outside.key"), 0o600);
        symlink(base.join("outside.key"), dir.join("out.key")).unwrap();
        symlink("../outside.key", dir.join("up.key")).unwrap();
        symlink("sub/ok.key", dir.join("in.key")).unwrap();

        for name in ["ok.key", "sub/ok.key", "in.key"] {
            assert_eq!(
                keys.read(Path::new(name)).as_deref(),
                Ok(&b"secret"[..]),
                "{name}"
            );
        }
        assert!(keys.read(&dir.join("ok.key")).is_ok(), "absolute, inside");

        let outside = format!("must name a file in the key directory {}", dir.display());
        for (name, want) in [
            (base.join("outside.key"), outside.as_str()),
            ("/etc/shadow".into(), outside.as_str()),
            ("../outside.key".into(), outside.as_str()),
            (dir.join("../outside.key"), outside.as_str()),
            (
                "out.key".into(),
                "a link that leads out of the key directory",
            ),
            (
                "up.key".into(),
                "a link that leads out of the key directory",
            ),
            ("gone.key".into(), "no such file in the key directory"),
            (
                "loose.key".into(),
                "has mode 0644: others may read it; 0600 or stricter",
            ),
            ("theirs.key".into(), "is owned by uid 65534, not root"),
            ("sub".into(), "is not a regular file"),
        ] {
            assert_eq!(keys.read(&name), Err(want.to_owned()), "{}", name.display());
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
