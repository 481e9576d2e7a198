//! Behaviour tests: real PostgreSQL clusters (from the test kit), pgvalve in process, real
//! clients (tokio-postgres, raw sockets, psql, pgbench, the pgvalve binary).

mod admission;
mod auth;
mod budget;
mod cli;
mod compat;
mod console;
mod databases;
mod kills;
mod limits;
mod loadtest;
mod locks;
mod neighbour;
mod operate;
mod packaging;
mod pids;
mod prepared;
mod queries;
mod robustness;
mod sessions;
mod slow;
mod support;
mod timeouts;
mod tls;
mod transaction;
