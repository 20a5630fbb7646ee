//! racewatch's modules, as a library: the `racewatch` binary is built on it, and the fuzz targets
//! (`fuzz/`) reach the parsers and renderers that take untrusted bytes through it.
//!
//! The rooms, each depending only on those listed before it (docs/ARCHITECTURE.md):
//! `text` (escaping, durations), `engine` (pure: correlation, verdicts, hazard, summary),
//! `probe` (ELF symbols, placement, loading and attaching, calibration), `process` (finding,
//! launching and waiting for processes), `targets` (the front ends: `native`, `python`),
//! `report` (sinks), `cli`, and `run` (one run, its loop).
pub mod text;

pub mod engine;

pub mod probe;
pub mod process;

pub mod targets;

pub mod report;

pub mod cli;
pub mod run;
