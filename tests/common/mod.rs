//! Shared test support: the fake upstream registry and small HTTP helpers.
#![allow(dead_code)]

pub mod fake_upstream;
pub mod http;
