//! How much the simulated channel itself costs: a round trip guest tty → backend socket → guest,
//! with nothing else in the path (no link, no broker).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

fn main() {
    let dir = system_tests::TestDir::new("simcost");
    let s = system_tests::channel::round_trip_samples(&dir.path, 3000);
    let us = |d: std::time::Duration| d.as_secs_f64() * 1e6;
    println!(
        "simulated channel round trip (guest → backend socket → guest): p50 {:.1} µs  p99 {:.1} µs",
        us(s[s.len() / 2]),
        us(s[s.len() * 99 / 100])
    );
}
