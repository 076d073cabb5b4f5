//! What the proxy knows of the KMS wire protocol, and nothing about policy.

pub mod answer;
pub mod classify;
pub mod credential;
pub mod operation;
pub mod protocol;
pub mod request;

pub use classify::{Refused, Route, Unreadable};
pub use credential::{Credential, CredentialError};
pub use operation::{Operation, TagOperation};
pub use request::{RequestError, Tag, TagChange};
