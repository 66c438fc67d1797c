//! Webhooks: durable push delivery of a consumer's events over HTTP.

pub mod client;
pub mod delivery;
pub mod signing;
pub mod supervisor;
