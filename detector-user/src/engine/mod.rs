//! The pure engine: what decides what a race is, from decoded events alone. No aya, no I/O, no
//! clock: every module here is tested with hand-written event sequences.
pub mod budget;
pub mod correlate;
pub mod cost;
pub mod dedup;
pub mod hazard;
pub mod histogram;
pub mod sampling;
pub mod stack;
pub mod summary;
