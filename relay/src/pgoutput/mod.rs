//! The `pgoutput` logical decoding protocol: the messages the walsender sends
//! inside the replication stream, decoded from bytes. Pure, no I/O.

pub mod decode;
