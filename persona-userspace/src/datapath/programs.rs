//! The programs of the BPF object: verified at load, attached to a device's tap as
//! pinned links, and run through BPF_PROG_TEST_RUN.
//!
//! Both directions run in tc (tcx), where the skb tells a partial checksum from a full
//! one and a GSO skb is rewritten once for all its segments; XDP only hosts the
//! optional, drop-only flood guard.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf,
    programs::{
        SchedClassifier, TcAttachType, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use persona_common::program_names;
use tracing::{info, warn};

use super::{DatapathError, Result};

/// tcx, the link-based tc attachment the programs are pinned with, came in Linux 6.6.
pub const MIN_KERNEL: (u32, u32) = (6, 6);

/// A program of the object, for test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    /// tcx ingress of the tap: what the VM sends.
    FromVm,
    /// tcx egress of the tap: what the VM receives.
    ToVm,
    /// XDP on the tap, when the device's flood guard is on.
    Guard,
    /// tcx ingress of an uplink, when the programs route by themselves.
    FromUplink,
    /// tcx egress of an uplink: a VM's packet into its persona's HTB class.
    ToUplink,
    /// Baselines: XDP_PASS, TC_ACT_OK, and TC_ACT_OK after one hash lookup.
    XdpPass,
    TcPass,
    TcLookup,
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Self::FromVm => program_names::FROM_VM,
            Self::ToVm => program_names::TO_VM,
            Self::Guard => program_names::GUARD,
            Self::FromUplink => program_names::FROM_UPLINK,
            Self::ToUplink => program_names::TO_UPLINK,
            Self::XdpPass => program_names::BASELINE,
            Self::TcPass => program_names::BASELINE_TC,
            Self::TcLookup => program_names::BASELINE_TC_LOOKUP,
        }
    }

    fn is_xdp(self) -> bool {
        matches!(self, Self::Guard | Self::XdpPass)
    }

    const ALL: [Program; 8] = [
        Self::FromVm,
        Self::ToVm,
        Self::Guard,
        Self::FromUplink,
        Self::ToUplink,
        Self::XdpPass,
        Self::TcPass,
        Self::TcLookup,
    ];
}

/// `release` as uname(2) gives it, e.g. "6.18.0-1-amd64".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Refuses kernels without tcx, saying which kernel this is.
pub fn check_kernel() -> Result<()> {
    let uts = nix::sys::utsname::uname()
        .map_err(|e| DatapathError::Bpf(format!("reading the kernel version: {e}")))?;
    let release = uts.release().to_string_lossy().into_owned();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(DatapathError::Bpf(format!(
            "persona needs Linux {}.{} or later (tcx links), this kernel is {release}",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))),
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Bpf(format!("program {name} missing from the object")))?;
    prog.try_into()
        .map_err(|e| DatapathError::Bpf(format!("program {name}: {e}")))
}

/// Loads (and so verifies) every program of the object.
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    for p in Program::ALL {
        let name = p.name();
        let loaded = if p.is_xdp() {
            program::<Xdp>(ebpf, name)?.load()
        } else {
            program::<SchedClassifier>(ebpf, name)?.load()
        };
        loaded.map_err(|e| DatapathError::Bpf(format!("verifying {name}: {e:#}")))?;
    }
    Ok(())
}

pub fn test_run(
    ebpf: &mut Ebpf,
    program: Program,
    opts: TestRunOptions<'_>,
) -> Result<TestRunResult> {
    let name = program.name();
    let res = if program.is_xdp() {
        self::program::<Xdp>(ebpf, name)?.test_run(opts)
    } else {
        self::program::<SchedClassifier>(ebpf, name)?.test_run(opts)
    };
    res.map_err(|e| {
        let cause = std::error::Error::source(&e).map_or(String::new(), |c| format!(": {c}"));
        DatapathError::Bpf(format!("BPF_PROG_TEST_RUN of {name}: {e}{cause}"))
    })
}

/// Pins a program's link, so that it outlives this process.
fn pin_link<L>(link: L, pin: &Path) -> Result<()>
where
    L: TryInto<FdLink>,
    L::Error: std::fmt::Display,
{
    let link: FdLink = link
        .try_into()
        .map_err(|e| DatapathError::Bpf(format!("link for {}: {e}", pin.display())))?;
    link.pin(pin)
        .map_err(|e| DatapathError::Bpf(format!("pinning {}: {e}", pin.display())))?;
    Ok(())
}

fn bpf(pin: &Path, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Bpf(format!("{}: {e}", pin.display()))
}

/// The pinned link, when it runs a program other than `ours` (an earlier run's, of
/// this build or another): replacing it goes through BPF_LINK_UPDATE, one atomic swap
/// with the traffic flowing, and the pin stays the link's.
fn running(pin: &Path, ours: u32) -> Result<Option<FdLink>> {
    let link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| bpf(pin, e))?);
    let theirs = link.info().map_err(|e| bpf(pin, e))?.program_id();
    Ok((theirs != ours).then_some(link))
}

/// The pinned links of one interface: a device's tap, or an uplink.
pub struct Links<'a> {
    pin_dir: &'a Path,
    ifindex: u32,
}

/// Link pins by what they hold. `xdp` held the from-VM program of releases that ran it
/// in XDP: it is removed on attach, or the VM's packets would be translated twice.
const FROM_VM_PIN: &str = "tc-in";
const TO_VM_PIN: &str = "tc";
const GUARD_PIN: &str = "guard";
const UPLINK_PIN: &str = "uplink";
const TO_UPLINK_PIN: &str = "to_uplink";
const LEGACY_XDP_PIN: &str = "xdp";

impl<'a> Links<'a> {
    pub fn new(pin_dir: &'a Path, ifindex: u32) -> Self {
        Self { pin_dir, ifindex }
    }

    fn pin(&self, kind: &str) -> PathBuf {
        self.pin_dir
            .join("links")
            .join(format!("{}-{kind}", self.ifindex))
    }

    fn interface(&self) -> Result<String> {
        nix::net::if_::if_indextoname(self.ifindex)
            .map(|n| n.to_string_lossy().into_owned())
            .map_err(|_| DatapathError::NoSuchInterface(self.ifindex.to_string()))
    }

    /// Attaches what is not attached yet: both tc programs, and the guard when wanted
    /// (removed when not).
    pub fn attach(&self, ebpf: &mut Ebpf, guard: bool) -> Result<()> {
        self.unpin(LEGACY_XDP_PIN)?;
        self.attach_tc(ebpf, Program::FromVm, TcAttachType::Ingress, FROM_VM_PIN)?;
        self.attach_tc(ebpf, Program::ToVm, TcAttachType::Egress, TO_VM_PIN)?;
        if guard {
            self.attach_guard(ebpf)
        } else {
            self.unpin(GUARD_PIN)
        }
    }

    /// An uplink's program, which redirects what the FIB routes to a device; `false`
    /// removes it.
    pub fn route_from_uplink(&self, ebpf: &mut Ebpf, on: bool) -> Result<()> {
        if on {
            self.attach_tc(ebpf, Program::FromUplink, TcAttachType::Ingress, UPLINK_PIN)
        } else {
            self.unpin(UPLINK_PIN)
        }
    }

    /// An uplink's egress program, which classes a VM's packets for the uplink's HTB;
    /// `false` removes it.
    pub fn shape_to_uplink(&self, ebpf: &mut Ebpf, on: bool) -> Result<()> {
        if on {
            self.attach_tc(ebpf, Program::ToUplink, TcAttachType::Egress, TO_UPLINK_PIN)
        } else {
            self.unpin(TO_UPLINK_PIN)
        }
    }

    fn attach_tc(
        &self,
        ebpf: &mut Ebpf,
        which: Program,
        hook: TcAttachType,
        kind: &str,
    ) -> Result<()> {
        let pin = self.pin(kind);
        let tc: &mut SchedClassifier = program(ebpf, which.name())?;
        if pin.exists() {
            let ours = tc.info().map_err(|e| bpf(&pin, e))?.id();
            if let Some(link) = running(&pin, ours)? {
                let link = SchedClassifierLink::try_from(link).map_err(|e| bpf(&pin, e))?;
                tc.attach_to_link(link).map_err(|e| bpf(&pin, e))?;
                info!(pin = %pin.display(), "replaced the program of an earlier run");
            }
            return Ok(());
        }
        let interface = self.interface()?;
        let id = tc.attach(&interface, hook).map_err(|e| {
            DatapathError::Bpf(format!("attaching tcx {hook:?} to {interface}: {e}"))
        })?;
        let link = tc
            .take_link(id)
            .map_err(|e| DatapathError::Bpf(e.to_string()))?;
        pin_link(link, &pin)
    }

    fn attach_guard(&self, ebpf: &mut Ebpf) -> Result<()> {
        let pin = self.pin(GUARD_PIN);
        let xdp: &mut Xdp = program(ebpf, Program::Guard.name())?;
        if pin.exists() {
            let ours = xdp.info().map_err(|e| bpf(&pin, e))?.id();
            if let Some(link) = running(&pin, ours)? {
                let link = XdpLink::try_from(link).map_err(|e| bpf(&pin, e))?;
                xdp.attach_to_link(link).map_err(|e| bpf(&pin, e))?;
                info!(pin = %pin.display(), "replaced the program of an earlier run");
            }
            return Ok(());
        }
        let ifindex = self.ifindex;
        let id = match xdp.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => id,
            Err(e) => {
                warn!(ifindex, error = %e, "native XDP refused, the flood guard runs generic");
                xdp.attach_to_if_index(ifindex, XdpMode::Skb)
                    .map_err(|e| DatapathError::Bpf(format!("attaching XDP to {ifindex}: {e}")))?
            }
        };
        let link = xdp
            .take_link(id)
            .map_err(|e| DatapathError::Bpf(e.to_string()))?;
        pin_link(link, &pin)
    }

    fn unpin(&self, kind: &str) -> Result<()> {
        let pin = self.pin(kind);
        if !pin.exists() {
            return Ok(());
        }
        let link = PinnedLink::from_pin(&pin)
            .map_err(|e| DatapathError::Bpf(format!("{}: {e}", pin.display())))?;
        drop(link.unpin().map_err(|source| DatapathError::Io {
            context: format!("unpinning {}", pin.display()),
            source,
        })?);
        if kind == LEGACY_XDP_PIN {
            info!(
                ifindex = self.ifindex,
                "removed the XDP program of an older release"
            );
        }
        Ok(())
    }

    /// Removes every program from the tap.
    pub fn detach(&self) -> Result<()> {
        for kind in [LEGACY_XDP_PIN, GUARD_PIN, FROM_VM_PIN, TO_VM_PIN] {
            self.unpin(kind)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_are_read_from_the_release() {
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("6.6.0"), Some((6, 6)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert!(kernel_version("5.15.0") < Some(MIN_KERNEL));
        assert_eq!(kernel_version("garbage"), None);
    }
}
