//! kms-tag-guard: a policy-enforcing reverse proxy for the AWS KMS API.
//!
//! Data flows one way: bytes -> [`kms::classify`] names the route -> [`kms`] parses a tag change
//! -> [`decide`] (with [`policy`]) turns it into a verdict -> [`record`] makes the audit record,
//! the metrics and the answer ([`answer`] for refusals) -> [`proxy`] answers or forwards the
//! untouched bytes. [`audit`] is the sink the records go to; [`integrity`] chains and signs what it
//! writes, and verifies it.

pub mod admin;
pub mod answer;
mod ascii;
pub mod audit;
pub mod cases;
pub mod config;
pub mod decide;
pub mod effective;
pub mod endpoints;
pub mod fds;
pub mod files;
pub mod fold;
pub mod glob;
pub mod heap;
pub mod identity;
pub mod integrity;
pub mod kms;
pub mod logs;
pub mod metrics;
pub mod mtls;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod reload;
pub mod replay;
pub mod schema;
mod text;
pub mod tls;
pub mod toml_reader;

pub use config::Config;
pub use proxy::{prepare, start, Prepared, RunningProxy, StartError};
