//! Deriving a device's country from an address with a MaxMind-format database.
use std::{net::IpAddr, path::Path};

use maxminddb::{Reader, geoip2};

pub struct GeoIp {
    reader: Reader<Vec<u8>>,
}

impl GeoIp {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let reader = Reader::open_readfile(path)
            .with_context(|| format!("opening the GeoIP database {}", path.display()))?;
        Ok(Self { reader })
    }

    /// The ISO country code the database gives for `ip`.
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let found = self.reader.lookup(ip).ok()?;
        let record: geoip2::Country = found.decode().ok()??;
        record.country.iso_code.map(str::to_owned)
    }
}
