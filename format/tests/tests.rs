//! Integration tests of ferry-format. Modules:
//! - `bundle`: the format against tampering, truncation, size lies, zstd bombs and key policies.

mod bundle;
mod common;
