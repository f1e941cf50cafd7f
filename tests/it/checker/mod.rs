//! A Jepsen-style history checker for Herald: the recorded histories (`history`), the pure
//! analysis of them (`check`) and the run's seeded randomness (`rng`).

mod check;
mod history;
mod rng;
