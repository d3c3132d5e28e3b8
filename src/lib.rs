//! AudioLib Gateway: a Pingora reverse proxy that answers `POST /v1/audio` itself (key check,
//! monthly quota, random track, presigned URL) and passes every other request to the origin
//! or CDN it stands in front of.
//!
//! # Layout
//! - [`config`]: the TOML file and environment, validated into one [`config::Config`].
//! - [`error`]: the error table of the API; every status, code and message.
//! - [`auth`]: the `Authorization` header, key format, key minting and digests.
//! - [`store`]: the storage trait for keys and quota; embedded and Redis implementations, and
//!   the quota leases that let Redis nodes serve most calls without a round trip; Redis
//!   Sentinel and `WAIT` in [`store::redis::sentinel`] and [`store::redis`].
//! - [`cache`]: the per-node key cache in front of the store.
//! - [`keys`]: key management, the operations behind the admin API.
//! - [`quota`]: UTC-month periods and the rate-limit fields.
//! - [`ledger`]: local quota knowledge: exhausted keys, fail-open counting and write-back.
//! - [`catalog`]: library files, the immutable snapshot and its reloads.
//! - [`sign`]: SigV4 presigned S3 URLs.
//! - [`api`]: `/v1/audio` without HTTP, the checks in the order of the spec.
//! - [`metrics`]: Prometheus metrics for `/metrics`.
//! - [`proxy`]: the Pingora glue for the public listener.
//! - [`admin`]: the admin API on its own listener.
//! - [`server`]: builds the app from the config and runs the services.
//! - [`shutdown`]: signals and draining in-flight requests.
//! - [`cli`]: the `audiolib` command.
//! - [`clock`]: injectable time.
//! - [`locks`]: poison-tolerant std locks and a per-key map of shared entries.

pub mod admin;
pub mod api;
pub mod auth;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod keys;
pub mod ledger;
pub mod locks;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod server;
pub mod shutdown;
pub mod sign;
pub mod store;
