//! AudioLib Gateway: a Pingora reverse proxy that answers `POST /v1/audio` itself (key check,
//! monthly quota, random track, presigned URL) and passes every other request to the origin
//! or CDN it stands in front of.
//!
//! # Layout
//! - [`config`]: the TOML file and environment, validated into one [`config::Config`].
//! - [`error`]: the error table of the API; every status, code and message.
//! - [`auth`]: the `Authorization` header, key format, key minting and digests.
//! - [`store`]: the storage traits for keys and quota; the embedded durable store (SQLite) and
//!   the Redis one (Sentinel and `WAIT` in [`store::redis::sentinel`]), and the quota leases
//!   through which both count: most calls need no round trip, leases are fenced, and the
//!   outage policy is bounded (SPEC §4a).
//! - [`cache`]: the per-node key cache in front of the store, with each worker thread's
//!   callers of the current second in front of it.
//! - [`keys`]: key management, the operations behind the admin API.
//! - [`accounts`]: accounts owning keys and sharing one monthly limit.
//! - [`last_used`]: when each key was last used, written in the background.
//! - [`key_calls`]: calls per key of an account, for its own usage history.
//! - [`quota`]: UTC-month periods and the rate-limit fields.
//! - [`rate`]: per-second rate limits of plans, a token bucket per subject and node.
//! - [`ledger`]: keys found exhausted, refused without asking the store again for a while.
//! - [`catalog`]: library files, the immutable snapshot and its reloads.
//! - [`sign`]: SigV4 presigned S3 URLs.
//! - [`answers`]: the 200 bodies of the current second, kept per thread.
//! - [`api`]: `/v1/audio` without HTTP, the checks in the order of the spec.
//! - [`metrics`]: Prometheus metrics for `/metrics`; what every request updates is kept per
//!   worker thread (`metrics::shards`).
//! - [`access_log`]: one line per request, written by its own thread (`text` or `json`).
//! - [`forwarding`]: `X-Forwarded-For`/`-Proto` for the upstream, and `trusted_proxies`.
//! - [`proxy`]: the Pingora glue for the public listener.
//! - [`connection`]: per-connection policy around it: pipelining, head deadline and budget,
//!   connection cap.
//! - [`request_id`]: the `X-Request-Id` kept or generated for each request.
//! - [`route`]: which route a request takes, however its path is spelled.
//! - [`tls`]: HTTPS on the public listener: the certificate pair and its reloads.
//! - [`upstream`]: the passthrough upstream's addresses, resolved in the background.
//! - [`admin`]: the admin API on its own listener; it also serves the OpenAPI documents
//!   (`docs/openapi/`).
//! - [`audit`]: the audit log of every change made through it.
//! - [`events`]: webhook events without I/O: ids, signatures, retry times.
//! - [`webhooks`]: recording events in the store's outbox and delivering them.
//! - [`portal`]: the developer portal on its own listener: sign-in, keys, usage, the
//!   operator's accounts view, and the invite links of `POST /admin/accounts`.
//! - [`server`]: builds the app from the config and runs the services.
//! - [`shutdown`]: signals, draining in-flight requests, and the upgrade handoff.
//! - [`systemd`]: readiness and main-process notices for `Type=notify` units.
//! - [`cli`]: the `audiolib` command.
//! - [`clock`]: injectable time.
//! - [`locks`]: poison-tolerant std locks and a per-key map of shared entries behind a
//!   reader-sharded lock.
//! - [`per_thread`]: a value per worker thread on cache lines of its own (metrics, access
//!   log lines).

pub mod access_log;
pub mod accounts;
pub mod admin;
pub mod answers;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod error;
pub mod events;
pub mod forwarding;
pub mod headers;
pub mod key_calls;
pub mod keys;
pub mod last_used;
pub mod ledger;
pub mod locks;
pub mod metrics;
pub mod per_thread;
pub mod portal;
pub mod proxy;
pub mod quota;
pub mod rate;
pub mod request_id;
pub mod route;
pub mod server;
pub mod shutdown;
pub mod sign;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod upstream;
pub mod webhooks;
