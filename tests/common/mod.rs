//! Shared test support: the fake upstream registry and small HTTP helpers.
#![allow(dead_code)]

pub mod fake_upstream;
pub mod http;

/// Reads the `wharf listening on ADDR` line a spawned `wharf serve` prints
/// when ready (its stdout must be piped) and returns ADDR.
pub fn listening_addr(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout piped");
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read wharf's stdout");
    line.trim()
        .strip_prefix("wharf listening on ")
        .unwrap_or_else(|| panic!("wharf did not start: first line {line:?}"))
        .to_string()
}
