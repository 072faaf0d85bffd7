//! The store's log: the writes a shift or a signal waits for, made durable by one
//! append and one fdatasync of a preallocated file (about a quarter of what a
//! durable redb commit of the same write costs on our disks: it writes a B-tree's
//! pages, several of them, in place). redb commits these writes without syncing; a
//! durable commit now and then (a checkpoint) makes the file hold everything, and the
//! log starts over under a new epoch.
//!
//! A record is `len u32 | crc32 u32 | epoch u64 | payload`, the checksum over the epoch
//! and the payload. Reading stops at the first record that is empty, torn, or of
//! another epoch: what an earlier epoch left further on is never taken for new.
use std::{
    fs::File,
    io,
    os::unix::fs::{FileExt as _, OpenOptionsExt as _},
    path::Path,
    sync::Arc,
};

const MAGIC: &[u8; 8] = b"prsnwal1";
const HEADER: u64 = 16;
const RECORD_HEADER: usize = 16;
/// The file's size, written once with zeros so that appends change no metadata.
pub const CAPACITY: u64 = 4 << 20;

pub struct Wal {
    file: File,
    /// The same file, for syncing without holding the log: a shift syncs its intent
    /// while another thread commits.
    sync: Arc<File>,
    epoch: u64,
    end: u64,
    /// Starting over fails, as on a failing disk.
    #[cfg(test)]
    pub fail_resets: bool,
}

impl Wal {
    /// Opens the log, creating it when missing; returns it with the payloads it holds
    /// for `epoch` (none when it belongs to an earlier one).
    pub fn open(path: &Path, epoch: u64) -> io::Result<(Self, Vec<Vec<u8>>)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let mut header = [0u8; HEADER as usize];
        let fresh = file.metadata()?.len() < CAPACITY
            || file.read_exact_at(&mut header, 0).is_err()
            || &header[..8] != MAGIC;
        let mut wal = Self {
            sync: Arc::new(file.try_clone()?),
            file,
            epoch,
            end: HEADER,
            #[cfg(test)]
            fail_resets: false,
        };
        if fresh {
            wal.file.write_all_at(&vec![0u8; CAPACITY as usize], 0)?;
            wal.reset(epoch)?;
            return Ok((wal, Vec::new()));
        }
        let logged = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        if logged != epoch {
            wal.reset(epoch)?;
            return Ok((wal, Vec::new()));
        }
        let mut records = Vec::new();
        while let Some(payload) = wal.read_at(wal.end)? {
            wal.end += (RECORD_HEADER + payload.len()) as u64;
            records.push(payload);
        }
        Ok((wal, records))
    }

    fn read_at(&self, at: u64) -> io::Result<Option<Vec<u8>>> {
        let mut head = [0u8; RECORD_HEADER];
        if at + RECORD_HEADER as u64 > CAPACITY || self.file.read_exact_at(&mut head, at).is_err() {
            return Ok(None);
        }
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as u64;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let epoch = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        if len == 0 || epoch != self.epoch || at + RECORD_HEADER as u64 + len > CAPACITY {
            return Ok(None);
        }
        let mut payload = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut payload, at + RECORD_HEADER as u64)?;
        Ok((checksum(epoch, &payload) == crc).then_some(payload))
    }

    /// Appends `payloads` and syncs them; fails, writing nothing, when they do not fit.
    #[cfg(test)]
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        self.write(payloads)?;
        self.sync.sync_data()
    }

    /// Appends `payloads` without syncing them: durable once [`Wal::syncer`]'s file is
    /// synced. Fails, writing nothing, when they do not fit.
    pub fn write(&mut self, payloads: &[Vec<u8>]) -> io::Result<()> {
        let mut buf = Vec::new();
        for p in payloads {
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(&checksum(self.epoch, p).to_le_bytes());
            buf.extend_from_slice(&self.epoch.to_le_bytes());
            buf.extend_from_slice(p);
        }
        // Room for one more record header after these.
        if self.end + buf.len() as u64 + RECORD_HEADER as u64 > CAPACITY {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "the log is full",
            ));
        }
        self.file.write_all_at(&buf, self.end)?;
        self.end += buf.len() as u64;
        Ok(())
    }

    /// What syncing makes the writes so far durable through.
    pub fn syncer(&self) -> Arc<File> {
        self.sync.clone()
    }

    /// Starts over under `epoch`, once the store holds everything logged so far.
    pub fn reset(&mut self, epoch: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_resets {
            return Err(io::Error::other("the disk failed (a test's)"));
        }
        let mut header = [0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&epoch.to_le_bytes());
        self.file.write_all_at(&header, 0)?;
        self.file.sync_data()?;
        self.epoch = epoch;
        self.end = HEADER;
        Ok(())
    }

    /// Bytes logged since the last reset.
    pub fn used(&self) -> u64 {
        self.end - HEADER
    }
}

fn checksum(epoch: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(payload);
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("persona-wal-{tag}-{}", std::process::id()))
    }

    #[test]
    fn records_come_back_until_the_log_starts_over() {
        let p = path("back");
        let (mut wal, none) = Wal::open(&p, 7).unwrap();
        assert!(none.is_empty());
        wal.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        wal.append(&[b"three".to_vec()]).unwrap();
        drop(wal);
        let (mut wal, got) = Wal::open(&p, 7).unwrap();
        assert_eq!(got, [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]);
        // Appends go on after what was read back.
        wal.append(&[b"four".to_vec()]).unwrap();
        let (_, got) = Wal::open(&p, 7).unwrap();
        assert_eq!(got.len(), 4);
        // A store that has made it all durable has moved on to another epoch.
        let (mut wal, got) = Wal::open(&p, 8).unwrap();
        assert!(got.is_empty(), "{got:?}");
        // Shorter records of the new epoch, then the old ones' bytes: never read.
        wal.append(&[b"5".to_vec()]).unwrap();
        let (_, got) = Wal::open(&p, 8).unwrap();
        assert_eq!(got, [b"5".to_vec()]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let p = path("torn");
        let (mut wal, _) = Wal::open(&p, 1).unwrap();
        wal.append(&[b"whole".to_vec()]).unwrap();
        let at = wal.end;
        wal.append(&[b"torn apart".to_vec()]).unwrap();
        drop(wal);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"X", at + RECORD_HEADER as u64 + 2).unwrap();
        let (_, got) = Wal::open(&p, 1).unwrap();
        assert_eq!(got, [b"whole".to_vec()]);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_full_log_refuses_and_writes_nothing() {
        let p = path("full");
        let (mut wal, _) = Wal::open(&p, 1).unwrap();
        let big = vec![1u8; (CAPACITY / 2) as usize];
        wal.append(std::slice::from_ref(&big)).unwrap();
        let used = wal.used();
        assert!(wal.append(&[big]).is_err());
        assert_eq!(wal.used(), used);
        std::fs::remove_file(&p).unwrap();
    }
}
