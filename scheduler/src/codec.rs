//! The one encoding of what a replica stores (log entries, vote, snapshots) and sends its peers
//! (Raft RPCs): MessagePack (`rmp-serde`) after a format byte. What older replicas wrote and
//! send, JSON, is still read, so a data directory of an older version opens as it is and an
//! older peer is still understood.
//!
//! MessagePack keeps serde's evolution rules that JSON had, in both directions: structs are
//! maps keyed by field name (`write_named`), so a field added with `#[serde(default)]` reads
//! older records, and an older version reading a newer record skips the field it does not know
//! (a mixed cluster replicates entries both ways during a rolling upgrade). Enum variants go by
//! name, so reordering them changes nothing already written; a new variant is not understood by
//! an older version, so a command it adds must wait until every member reads it (as
//! `Command::Batch` waits, see `proposer`). Values written while structs were arrays (builds
//! between JSON and this rule) still decode: serde reads a struct from either, those by
//! position, so fields are still only ever added at the end of a struct.
//!
//! JSON values begin with `{`, `[`, `"`, a digit, `-`, a letter or white space, never with
//! [`MSGPACK_V1`]: one byte tells the formats apart.

use serde::{de::DeserializeOwned, Serialize};

/// The first byte of every value written in this format.
pub const MSGPACK_V1: u8 = 0x01;

/// gRPC metadata on every reply of the Raft service: the replica reads the current format.
pub const CODEC_HEADER: &str = "dormant-codec";
/// [`CODEC_HEADER`]'s value for [`MSGPACK_V1`].
pub const CODEC_MSGPACK_V1: &str = "msgpack-v1";

/// How a value is (or was) encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `MSGPACK_V1`, then MessagePack.
    MsgpackV1,
    /// Plain JSON: what replicas before this format wrote and sent, and still understand.
    LegacyJson,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("encode as JSON: {0}")]
    EncodeJson(serde_json::Error),
    #[error("decode MessagePack: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("decode JSON (written by an older version): {0}")]
    DecodeJson(serde_json::Error),
    #[error("empty value")]
    Empty,
}

/// The format `bytes` are in.
pub fn format_of(bytes: &[u8]) -> Result<Format, CodecError> {
    match bytes.first() {
        None => Err(CodecError::Empty),
        Some(&MSGPACK_V1) => Ok(Format::MsgpackV1),
        Some(_) => Ok(Format::LegacyJson),
    }
}

/// `value` in the current format.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_as(Format::MsgpackV1, value)
}

/// `value` in `format`: JSON only for a peer that understands nothing else.
pub fn encode_as<T: Serialize + ?Sized>(format: Format, value: &T) -> Result<Vec<u8>, CodecError> {
    match format {
        Format::MsgpackV1 => {
            let mut out = Vec::with_capacity(256);
            out.push(MSGPACK_V1);
            rmp_serde::encode::write_named(&mut out, value)?;
            Ok(out)
        }
        Format::LegacyJson => serde_json::to_vec(value).map_err(CodecError::EncodeJson),
    }
}

/// Reads a value in either format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    match format_of(bytes)? {
        Format::MsgpackV1 => Ok(rmp_serde::from_slice(&bytes[1..])?),
        Format::LegacyJson => serde_json::from_slice(bytes).map_err(CodecError::DecodeJson),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Kind {
        Small,
        Large { size: u64 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Before {
        name: String,
        kind: Kind,
    }

    /// `Before` with a field added at the end, as the format allows.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct After {
        name: String,
        kind: Kind,
        #[serde(default)]
        labels: Vec<String>,
    }

    #[test]
    fn values_round_trip_and_are_marked_with_the_format_byte() {
        let v = Before {
            name: "a".into(),
            kind: Kind::Large { size: 7 },
        };
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], MSGPACK_V1);
        assert_eq!(format_of(&bytes).unwrap(), Format::MsgpackV1);
        assert_eq!(decode::<Before>(&bytes).unwrap(), v);
        let json = encode_as(Format::LegacyJson, &v).unwrap();
        assert_eq!(json, serde_json::to_vec(&v).unwrap());
        assert_eq!(decode::<Before>(&json).unwrap(), v);
    }

    #[test]
    fn a_field_added_at_the_end_reads_older_records_in_both_formats() {
        let old = Before {
            name: "a".into(),
            kind: Kind::Small,
        };
        for format in [Format::MsgpackV1, Format::LegacyJson] {
            let read: After = decode(&encode_as(format, &old).unwrap()).unwrap();
            assert_eq!(read.labels, Vec::<String>::new(), "{format:?}");
            assert_eq!(read.kind, Kind::Small);
        }
    }

    #[test]
    fn an_older_version_reads_a_newer_record_and_skips_the_field_it_does_not_know() {
        let new = After {
            name: "a".into(),
            kind: Kind::Large { size: 9 },
            labels: vec!["x".into()],
        };
        for format in [Format::MsgpackV1, Format::LegacyJson] {
            let read: Before = decode(&encode_as(format, &new).unwrap()).unwrap();
            assert_eq!(read.name, "a", "{format:?}");
            assert_eq!(read.kind, Kind::Large { size: 9 });
        }
    }

    #[test]
    fn structs_written_as_arrays_by_earlier_builds_still_decode() {
        let old = Before {
            name: "a".into(),
            kind: Kind::Small,
        };
        let mut bytes = vec![MSGPACK_V1];
        rmp_serde::encode::write(&mut bytes, &old).unwrap();
        assert_eq!(decode::<Before>(&bytes).unwrap(), old);
        let read: After = decode(&bytes).unwrap();
        assert!(read.labels.is_empty());
    }

    #[test]
    fn json_written_by_an_older_version_is_read() {
        let json = br#"{"name":"a","kind":{"Large":{"size":3}}}"#;
        assert_eq!(format_of(json).unwrap(), Format::LegacyJson);
        let read: Before = decode(json).unwrap();
        assert_eq!(read.kind, Kind::Large { size: 3 });
        // White space first, as a pretty-printed file would have.
        let read: Before = decode(b" {\"name\":\"b\",\"kind\":\"Small\"}").unwrap();
        assert_eq!(read.name, "b");
    }

    #[test]
    fn bad_input_is_an_error_naming_the_format() {
        assert!(matches!(decode::<Before>(b""), Err(CodecError::Empty)));
        let err = decode::<Before>(&[MSGPACK_V1, 0xc1]).unwrap_err();
        assert!(err.to_string().starts_with("decode MessagePack"), "{err}");
        let err = decode::<Before>(b"{\"name\":").unwrap_err();
        assert!(err.to_string().contains("older version"), "{err}");
    }
}
