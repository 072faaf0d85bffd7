//! Helpers shared by the end-to-end tests: frames built byte by byte with checksums
//! computed from scratch, a datapath on its own pin directory, and network namespaces.
pub mod capture;
pub mod daemon;
pub mod etcd;
pub mod fleet;
pub mod frames;
pub mod guest;
pub mod harness;
pub mod inspect;
pub mod lab;
pub mod libvirt;
pub mod netns;
pub mod sink;
pub mod tap;
