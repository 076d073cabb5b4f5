//! kms-tag-guard: a policy-enforcing reverse proxy for the AWS KMS API.
//!
//! Data flows one way: bytes -> [`kms`] turns them into a [`kms::TagChange`] -> [`policy`] turns
//! that into a [`policy::Decision`] -> [`audit`] records it -> [`proxy`] answers or forwards the
//! untouched bytes.

pub mod admin;
mod ascii;
pub mod audit;
pub mod cases;
pub mod config;
pub mod endpoints;
pub mod fds;
pub mod files;
pub mod fold;
pub mod glob;
pub mod inspect;
pub mod kms;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod tls;

pub use config::Config;
pub use proxy::{start, RunningProxy, StartError};
