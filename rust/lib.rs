//! DynaMO sequence-level core. Algorithm modules are plain Rust (tested by `cargo test`);
//! `python` (feature-gated) is the only PyO3 code.

#[cfg(feature = "python")]
mod python;
