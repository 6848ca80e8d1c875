//! Checks shared by the fuzz targets of `fedmesh-protocol` and by its corpus replay test
//! (`protocol/tests/fuzz_corpus.rs` includes `oracles.rs` directly).

mod oracles;

pub use oracles::*;
