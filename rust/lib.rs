//! DynaMO sequence-level core: exact variance-minimising rollout allocation and Beta pass-rate
//! pools. The algorithm modules are plain Rust, tested by `cargo test`; `python`
//! (feature-gated) is the only PyO3 code and only converts types and errors.

pub mod allocate;
pub mod calibration;
pub mod error;
pub mod estimator;
pub mod explore;
pub mod filter;
pub mod neyman;
pub mod parallel;
pub mod pool;
pub mod priced;
pub mod rules;
pub mod skip;
pub mod storage;

pub use allocate::{allocate, Options, Rule};
pub use error::{Error, Result};
pub use estimator::Estimator;
pub use pool::{PassRatePool, PoolAllocateOptions};
pub use skip::Selection;

#[cfg(feature = "python")]
mod python;
