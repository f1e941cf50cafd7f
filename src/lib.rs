//! Herald: durable real-time notification delivery.
//!
//! Backends enqueue events over HTTP (`api`); each event is committed to PostgreSQL (`store`) before the
//! answer, published to RabbitMQ with confirms (`queue`, `pipeline`), consumed by a worker pool that
//! broadcasts it to the user's topic (`pubsub`), and pushed to the user's Phoenix Channels clients
//! (`socket`). Every stage reports to StatsD (`metrics`).
//!
//! Dependencies point one way: `api`, `socket` and `pipeline` use `store`, `queue`, `pubsub` and
//! `metrics`; those leaves use none of each other (only the shared types in `event`). Socket tokens
//! (`token`) are a leaf too: the API signs them and the socket verifies them.
#![warn(missing_docs)]

pub mod api;
pub mod app;
pub mod backoff;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod errors;
pub mod event;
pub mod metrics;
pub mod pipeline;
pub mod pubsub;
pub mod queue;
pub mod server;
pub mod socket;
pub mod store;
pub mod token;
pub mod traces;
pub mod webpush;

pub use app::App;
pub use config::Settings;
