//! The integration tests, as one test binary: tract (the independent oracle) is compiled and
//! linked once instead of once per file. Each module is one concern; `common` holds the shared
//! helpers (fixture manifest, the real binary, tract).

mod common;

mod cli;
mod edges;
mod families;
mod fidelity;
mod fixtures;
mod fuzz_regressions;
mod graphs;
mod hostile;
mod layout;
mod linear;
mod linear_properties;
mod people;
mod properties;
mod readme;
mod verify;
