//! racewatch's modules, as a library: the `racewatch` binary is built on it, and the fuzz targets
//! (`fuzz/`) reach the parsers and renderers that take untrusted bytes through it.
pub mod calibrate;
pub mod cli;
pub mod collector;
pub mod correlate;
pub mod dedup;
pub mod hazard;
pub mod histogram;
pub mod info;
pub mod loader;
pub mod output;
pub mod placement;
pub mod preflight;
pub mod python;
pub mod sampling;
pub mod session;
pub mod stack;
pub mod symbols;
pub mod target;
