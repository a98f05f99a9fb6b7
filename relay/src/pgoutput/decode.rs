//! Decoding of what the walsender sends inside CopyData: the replication
//! envelope (XLogData, primary keepalive) and the pgoutput messages (protocol
//! version 1) carried by XLogData. Pure functions over bytes, no I/O.

use bytes::{Buf, Bytes};

use crate::postgres::lsn::Lsn;

/// A malformed or unexpected message from the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field it must contain.
    #[error("pgoutput message `{tag}` is truncated: it ends before its {field}")]
    Truncated {
        /// The message tag.
        tag: char,
        /// The field that was cut off.
        field: &'static str,
    },
    /// A tag this relay does not know; the server speaks a newer protocol than we asked for.
    #[error(
        "unknown {layer} message tag `{tag}` (0x{byte:02x}); the server sent a message of a protocol \
         version this relay does not speak"
    )]
    UnknownTag {
        /// Which layer: `replication` or `pgoutput`.
        layer: &'static str,
        /// The tag as a character.
        tag: char,
        /// The tag byte.
        byte: u8,
    },
    /// A field holds a value that the protocol does not allow.
    #[error("pgoutput message `{tag}` has an invalid {field}")]
    Invalid {
        /// The message tag.
        tag: char,
        /// The offending field.
        field: &'static str,
    },
    /// The message was empty.
    #[error("empty {0} message")]
    Empty(&'static str),
}

/// One CopyData payload of the replication stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ReplicationMessage {
    /// `w`: a piece of WAL, decoded by the output plugin.
    XLogData {
        /// Where this message's WAL starts (0/0 for some pgoutput messages).
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// `k`: the server's heartbeat.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The server's clock, microseconds since 2000-01-01.
        server_clock: i64,
        /// Whether the server wants a status update right away.
        reply_requested: bool,
    },
}

/// A column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key.
    pub is_key: bool,
    /// The column name.
    pub name: String,
    /// The column's type oid.
    pub type_oid: u32,
}

/// A Relation message: the shape of a published table, sent before its first
/// row in a session and again whenever the table changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid, which row messages refer to.
    pub oid: u32,
    /// The schema.
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// The columns, in the order row messages carry them.
    pub columns: Vec<RelationColumn>,
}

/// One column value of a row message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (only in updates).
    Unchanged,
    /// A value in text format.
    Text(Bytes),
    /// A value in binary format (only when binary mode was requested).
    Binary(Bytes),
}

/// A pgoutput message (protocol version 1 plus the tags of later versions,
/// which are recognised so they can be skipped).
#[derive(Debug, Clone, PartialEq)]
pub enum LogicalMessage {
    /// `B`: a transaction starts.
    Begin {
        /// LSN of the commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// `C`: the transaction is complete.
    Commit {
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// The end of the commit record: the position to confirm once delivered.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01.
        commit_ts: i64,
    },
    /// `R`: a table's shape.
    Relation(Relation),
    /// `I`: a new row.
    Insert {
        /// The table's oid.
        rel_oid: u32,
        /// The row's values.
        tuple: Vec<Cell>,
    },
    /// `M`: a logical decoding message (`pg_logical_emit_message`), sent
    /// because the relay asks for `messages`.
    Message {
        /// Whether it was emitted as part of its transaction (sent between
        /// that transaction's Begin and Commit) or on its own.
        transactional: bool,
        /// The message's own WAL position.
        lsn: Lsn,
        /// The prefix it was emitted with, as bytes: the database's
        /// encoding need not be UTF-8, and only an exact match matters.
        prefix: Bytes,
        /// The content.
        content: Bytes,
    },
    /// Any message the relay does not act on (Origin, Type, Update, Delete,
    /// Truncate, streaming and two-phase control).
    Other {
        /// The tag, for the debug log.
        tag: char,
    },
}

/// Decodes one CopyData payload of the replication stream.
pub fn replication_message(mut buf: Bytes) -> Result<ReplicationMessage, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty("replication"));
    }
    let tag = buf.get_u8();
    match tag {
        b'w' => {
            need(&buf, 24, 'w', "header")?;
            let wal_start = Lsn(buf.get_u64());
            let wal_end = Lsn(buf.get_u64());
            let _server_clock = buf.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data: buf,
            })
        }
        b'k' => {
            need(&buf, 17, 'k', "header")?;
            Ok(ReplicationMessage::Keepalive {
                wal_end: Lsn(buf.get_u64()),
                server_clock: buf.get_i64(),
                reply_requested: buf.get_u8() == 1,
            })
        }
        other => Err(DecodeError::UnknownTag {
            layer: "replication",
            tag: other as char,
            byte: other,
        }),
    }
}

/// Decodes one pgoutput message (protocol version 1, not streaming).
pub fn logical_message(mut buf: Bytes) -> Result<LogicalMessage, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty("pgoutput"));
    }
    let byte = buf.get_u8();
    let tag = byte as char;
    match byte {
        b'B' => {
            need(&buf, 20, tag, "header")?;
            Ok(LogicalMessage::Begin {
                final_lsn: Lsn(buf.get_u64()),
                commit_ts: buf.get_i64(),
                xid: buf.get_u32(),
            })
        }
        b'C' => {
            need(&buf, 25, tag, "header")?;
            let _flags = buf.get_u8();
            Ok(LogicalMessage::Commit {
                commit_lsn: Lsn(buf.get_u64()),
                end_lsn: Lsn(buf.get_u64()),
                commit_ts: buf.get_i64(),
            })
        }
        b'R' => {
            need(&buf, 4, tag, "relation oid")?;
            let oid = buf.get_u32();
            let namespace = cstr(&mut buf, tag, "namespace")?;
            let name = cstr(&mut buf, tag, "relation name")?;
            need(&buf, 3, tag, "column count")?;
            let _replica_identity = buf.get_u8();
            let ncols = buf.get_i16();
            if ncols < 0 {
                return Err(DecodeError::Invalid {
                    tag,
                    field: "column count",
                });
            }
            let mut columns = Vec::with_capacity(ncols as usize);
            for _ in 0..ncols {
                need(&buf, 1, tag, "column flags")?;
                let flags = buf.get_u8();
                let name = cstr(&mut buf, tag, "column name")?;
                need(&buf, 8, tag, "column type")?;
                let type_oid = buf.get_u32();
                let _type_modifier = buf.get_i32();
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name,
                    type_oid,
                });
            }
            Ok(LogicalMessage::Relation(Relation {
                oid,
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            need(&buf, 5, tag, "relation oid")?;
            let rel_oid = buf.get_u32();
            let marker = buf.get_u8();
            if marker != b'N' {
                return Err(DecodeError::Invalid {
                    tag,
                    field: "tuple marker (expected `N`)",
                });
            }
            let tuple = tuple_data(&mut buf, tag)?;
            Ok(LogicalMessage::Insert { rel_oid, tuple })
        }
        b'M' => {
            // Protocol version 1 without streaming: no xid field.
            need(&buf, 9, tag, "flags and lsn")?;
            let flags = buf.get_u8();
            let lsn = Lsn(buf.get_u64());
            let end = buf
                .iter()
                .position(|&b| b == 0)
                .ok_or(DecodeError::Truncated {
                    tag,
                    field: "prefix",
                })?;
            let prefix = buf.split_to(end);
            buf.advance(1);
            need(&buf, 4, tag, "content length")?;
            let len = buf.get_i32();
            if len < 0 {
                return Err(DecodeError::Invalid {
                    tag,
                    field: "content length",
                });
            }
            need(&buf, len as usize, tag, "content")?;
            Ok(LogicalMessage::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: buf.split_to(len as usize),
            })
        }
        // Known messages the relay does not act on. Streaming (S, E, c, A) and
        // two-phase (b, P, K, r, p) tags only appear with options we never
        // request, but are named here so they are skipped, not fatal.
        b'O' | b'Y' | b'U' | b'D' | b'T' | b'S' | b'E' | b'c' | b'A' | b'b' | b'P' | b'K'
        | b'r' | b'p' => Ok(LogicalMessage::Other { tag }),
        _ => Err(DecodeError::UnknownTag {
            layer: "pgoutput",
            tag,
            byte,
        }),
    }
}

fn tuple_data(buf: &mut Bytes, tag: char) -> Result<Vec<Cell>, DecodeError> {
    need(buf, 2, tag, "tuple column count")?;
    let ncols = buf.get_i16();
    if ncols < 0 {
        return Err(DecodeError::Invalid {
            tag,
            field: "tuple column count",
        });
    }
    let mut cells = Vec::with_capacity(ncols as usize);
    for _ in 0..ncols {
        need(buf, 1, tag, "tuple column kind")?;
        let cell = match buf.get_u8() {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            kind @ (b't' | b'b') => {
                need(buf, 4, tag, "tuple value length")?;
                let len = buf.get_i32();
                if len < 0 {
                    return Err(DecodeError::Invalid {
                        tag,
                        field: "tuple value length",
                    });
                }
                need(buf, len as usize, tag, "tuple value")?;
                let value = buf.split_to(len as usize);
                if kind == b't' {
                    Cell::Text(value)
                } else {
                    Cell::Binary(value)
                }
            }
            _ => {
                return Err(DecodeError::Invalid {
                    tag,
                    field: "tuple column kind",
                });
            }
        };
        cells.push(cell);
    }
    Ok(cells)
}

fn need(buf: &Bytes, len: usize, tag: char, field: &'static str) -> Result<(), DecodeError> {
    if buf.remaining() < len {
        Err(DecodeError::Truncated { tag, field })
    } else {
        Ok(())
    }
}

fn cstr(buf: &mut Bytes, tag: char, field: &'static str) -> Result<String, DecodeError> {
    let end = buf
        .iter()
        .position(|&b| b == 0)
        .ok_or(DecodeError::Truncated { tag, field })?;
    let s = String::from_utf8(buf.split_to(end).to_vec())
        .map_err(|_| DecodeError::Invalid { tag, field })?;
    buf.advance(1);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.put_u32(16384);
        b.extend_from_slice(b"public\0outbox\0");
        b.put_u8(b'd');
        b.put_i16(2);
        b.put_u8(1);
        b.extend_from_slice(b"id\0");
        b.put_u32(2950);
        b.put_i32(-1);
        b.put_u8(0);
        b.extend_from_slice(b"payload\0");
        b.put_u32(3802);
        b.put_i32(-1);
        b
    }

    #[test]
    fn decodes_relation() {
        let msg = logical_message(Bytes::from(relation_bytes())).unwrap();
        let LogicalMessage::Relation(rel) = msg else {
            panic!("not a relation: {msg:?}")
        };
        assert_eq!(rel.oid, 16384);
        assert_eq!(rel.namespace, "public");
        assert_eq!(rel.name, "outbox");
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].is_key);
        assert_eq!(rel.columns[1].name, "payload");
        assert_eq!(rel.columns[1].type_oid, 3802);
    }

    #[test]
    fn decodes_insert_with_all_cell_kinds() {
        let mut b = vec![b'I'];
        b.put_u32(16384);
        b.put_u8(b'N');
        b.put_i16(4);
        b.put_u8(b't');
        b.put_i32(3);
        b.extend_from_slice(b"abc");
        b.put_u8(b'n');
        b.put_u8(b'u');
        b.put_u8(b'b');
        b.put_i32(1);
        b.put_u8(7);
        let msg = logical_message(Bytes::from(b)).unwrap();
        assert_eq!(
            msg,
            LogicalMessage::Insert {
                rel_oid: 16384,
                tuple: vec![
                    Cell::Text(Bytes::from_static(b"abc")),
                    Cell::Null,
                    Cell::Unchanged,
                    Cell::Binary(Bytes::from_static(&[7])),
                ],
            }
        );
    }

    #[test]
    fn decodes_a_logical_decoding_message() {
        let mut b = vec![b'M', 1];
        b.put_u64(0x2a);
        b.extend_from_slice(b"outbox\0");
        b.put_i32(4);
        b.extend_from_slice(b"{}[]");
        assert_eq!(
            logical_message(Bytes::from(b.clone())).unwrap(),
            LogicalMessage::Message {
                transactional: true,
                lsn: Lsn(0x2a),
                prefix: Bytes::from_static(b"outbox"),
                content: Bytes::from_static(b"{}[]"),
            }
        );
        // Non-transactional, and a prefix that is not UTF-8.
        let mut n = vec![b'M', 0];
        n.put_u64(1);
        n.extend_from_slice(b"\xff\0");
        n.put_i32(0);
        assert!(matches!(
            logical_message(Bytes::from(n)).unwrap(),
            LogicalMessage::Message { transactional: false, ref prefix, ref content, .. }
                if &prefix[..] == b"\xff" && content.is_empty()
        ));
        // Cut anywhere: truncated, never a panic.
        for cut in 1..b.len() {
            assert!(
                logical_message(Bytes::copy_from_slice(&b[..cut])).is_err(),
                "cut at {cut}"
            );
        }
        let mut neg = vec![b'M', 1];
        neg.put_u64(1);
        neg.extend_from_slice(b"p\0");
        neg.put_i32(-1);
        assert!(matches!(
            logical_message(Bytes::from(neg)),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn decodes_begin_and_commit() {
        let mut b = vec![b'B'];
        b.put_u64(0x10);
        b.put_i64(5);
        b.put_u32(700);
        assert_eq!(
            logical_message(Bytes::from(b)).unwrap(),
            LogicalMessage::Begin {
                final_lsn: Lsn(0x10),
                commit_ts: 5,
                xid: 700
            }
        );
        let mut c = vec![b'C', 0];
        c.put_u64(0x10);
        c.put_u64(0x40);
        c.put_i64(5);
        assert_eq!(
            logical_message(Bytes::from(c)).unwrap(),
            LogicalMessage::Commit {
                commit_lsn: Lsn(0x10),
                end_lsn: Lsn(0x40),
                commit_ts: 5
            }
        );
    }

    #[test]
    fn skips_known_and_refuses_unknown_tags() {
        assert_eq!(
            logical_message(Bytes::from_static(b"Yxyz")).unwrap(),
            LogicalMessage::Other { tag: 'Y' }
        );
        let err = logical_message(Bytes::from_static(b"Z")).unwrap_err();
        assert!(matches!(err, DecodeError::UnknownTag { tag: 'Z', .. }));
        assert!(err.to_string().contains("unknown pgoutput message tag `Z`"));
    }

    #[test]
    fn reports_truncation_instead_of_panicking() {
        let full = relation_bytes();
        for cut in 1..full.len() {
            let err = logical_message(Bytes::from(full[..cut].to_vec())).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated { tag: 'R', .. }),
                "cut at {cut}: {err}"
            );
        }
        let mut b = vec![b'I'];
        b.put_u32(1);
        b.put_u8(b'N');
        b.put_i16(1);
        b.put_u8(b't');
        b.put_i32(10);
        b.extend_from_slice(b"abc");
        assert!(matches!(
            logical_message(Bytes::from(b)).unwrap_err(),
            DecodeError::Truncated {
                tag: 'I',
                field: "tuple value"
            }
        ));
    }

    #[test]
    fn decodes_replication_envelope() {
        let mut w = vec![b'w'];
        w.put_u64(1);
        w.put_u64(2);
        w.put_i64(3);
        w.extend_from_slice(b"B");
        let ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            data,
        } = replication_message(Bytes::from(w)).unwrap()
        else {
            panic!()
        };
        assert_eq!((wal_start, wal_end, &data[..]), (Lsn(1), Lsn(2), &b"B"[..]));
        let mut k = vec![b'k'];
        k.put_u64(9);
        k.put_i64(3);
        k.put_u8(1);
        assert_eq!(
            replication_message(Bytes::from(k)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(9),
                server_clock: 3,
                reply_requested: true
            }
        );
        assert!(replication_message(Bytes::from_static(b"q")).is_err());
        assert!(replication_message(Bytes::from_static(b"k12")).is_err());
    }

    proptest::proptest! {
        /// Issue 10, item 11: no bytes from the server make the decoders
        /// panic; they return an error instead.
        #[test]
        fn decoders_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let body = Bytes::from(body);
            let _ = replication_message(body.clone());
            let _ = logical_message(body);
        }

        /// The same, for messages that start with a valid tag.
        #[test]
        fn decoders_never_panic_on_known_tags(
            tag in proptest::sample::select(&b"BCRIUDTOMYwk"[..]),
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let bytes = Bytes::from(bytes);
            let _ = replication_message(bytes.clone());
            let _ = logical_message(bytes);
        }
    }
}
