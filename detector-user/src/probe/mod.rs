//! Probing: reading ELF files for functions and where to probe them, loading racewatch's eBPF
//! object, attaching it, and asking the kernel what it supports and what a probe costs.
pub mod calibrate;
pub mod callees;
pub mod closing;
pub mod code;
pub mod copies;
pub mod debuginfod;
pub mod dwarf;
pub mod info;
pub mod kernel;
pub mod loader;
pub mod miss_path;
pub mod placement;
pub mod plan;
pub mod preflight;
pub mod returns;
pub mod symbols;
