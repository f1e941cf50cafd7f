//! Integration tests: one binary (one link), each test with its own node, database and queue names,
//! against the real PostgreSQL and RabbitMQ.

mod admin;
mod api;
mod catchup;
mod chaos;
mod checker;
mod cluster;
mod common;
mod deploy;
mod gaps;
mod head_start;
mod hostile;
mod inbox;
mod ingest;
mod metrics;
mod openapi;
mod operator;
mod partitions;
mod pipeline;
mod plans;
mod rabbitmq_cluster;
mod replay;
mod resilience;
mod retry;
mod socket;
mod sweep;
mod traces;
mod webpush;
