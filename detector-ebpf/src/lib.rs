#![no_std]
// This library target lets detector-user depend on this crate in its build.rs (aya-build).
