//! Builds the eBPF object (detector-ebpf's `detector` binary) for the BPF target with aya-build;
//! main.rs embeds it from OUT_DIR.
fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../detector-ebpf");
    let ebpf = aya_build::Package {
        name: "detector-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
