//! Criterion benchmarks of the media plane live in `benches/`; run them
//! with `cargo bench -p benches`.
