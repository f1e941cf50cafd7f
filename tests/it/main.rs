//! Integration tests: one binary (one link), each test with its own node, database and queue names,
//! against the real PostgreSQL and RabbitMQ.

mod api;
mod catchup;
mod cluster;
mod common;
mod pipeline;
mod resilience;
mod socket;
