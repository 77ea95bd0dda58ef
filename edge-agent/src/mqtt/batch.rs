//! Batch payloads: the `Batch` JSON envelope built around raw buffer records,
//! under a byte limit. No I/O here.
//!
//! Records are already JSON objects (the buffer stores what the producer
//! serialised), so a batch is the envelope's fields followed by the record
//! bytes joined with commas: nothing is parsed or re-serialised on the way out.

use ferry_protocol::{SCHEMA_VERSION, Stream, message_id};

/// Upper bound of the digits of a `u64`: the envelope's size is computed
/// with the widest ids and timestamp, so a planned batch can never outgrow
/// its limit once the real values are filled in.
const U64_DIGITS_MAX: u64 = u64::MAX;

/// The fixed part of every batch of one device and stream.
#[derive(Debug, Clone)]
pub(crate) struct Envelope {
    device: String,
    fleet: String,
    stream: Stream,
    /// Bytes available for the records and the commas between them.
    budget: usize,
}

/// What to do with the records at the head of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Publish the first `n` records (n ≥ 1) as one batch.
    Publish(usize),
    /// The first record can never be published: drop it (it would wedge the
    /// stream otherwise).
    Drop(DropReason),
}

/// Why a record is dropped instead of published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Larger than the message limit on its own, envelope included.
    TooLarge,
    /// Not a JSON object (`{...}`); it would make the whole batch unparseable.
    NotAnObject,
}

impl DropReason {
    pub(crate) fn code(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::NotAnObject => "not_an_object",
        }
    }
}

impl Envelope {
    /// `None` when `max_bytes` cannot hold even the envelope.
    pub(crate) fn new(
        device: &str,
        fleet: &str,
        stream: Stream,
        max_bytes: usize,
    ) -> Option<Envelope> {
        let mut env = Envelope {
            device: device.to_string(),
            fleet: fleet.to_string(),
            stream,
            budget: 0,
        };
        let widest = env
            .prefix(U64_DIGITS_MAX, U64_DIGITS_MAX, U64_DIGITS_MAX)
            .len()
            + SUFFIX.len();
        env.budget = max_bytes.checked_sub(widest).filter(|b| *b > 0)?;
        Some(env)
    }

    /// Bytes left for records (and the commas between them).
    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    /// How many of `records` (payload sizes and first/last bytes are all
    /// that is looked at) go into the next batch.
    pub(crate) fn plan<'a>(&self, records: impl IntoIterator<Item = &'a [u8]>) -> Option<Plan> {
        let mut used = 0usize;
        let mut n = 0usize;
        for payload in records {
            if !looks_like_object(payload) {
                return Some(if n == 0 {
                    Plan::Drop(DropReason::NotAnObject)
                } else {
                    Plan::Publish(n)
                });
            }
            let add = payload.len() + usize::from(n > 0);
            if used + add > self.budget {
                return Some(if n == 0 {
                    Plan::Drop(DropReason::TooLarge)
                } else {
                    Plan::Publish(n)
                });
            }
            used += add;
            n += 1;
        }
        (n > 0).then_some(Plan::Publish(n))
    }

    /// The batch JSON for `records` (ids ascending; `records` non-empty and
    /// accepted by [`Envelope::plan`]).
    pub(crate) fn encode(&self, records: &[(u64, &[u8])], sent_ms: u64) -> Vec<u8> {
        let first = records.first().map_or(0, |r| r.0);
        let last = records.last().map_or(0, |r| r.0);
        let prefix = self.prefix(first, last, sent_ms);
        let body: usize = records.iter().map(|r| r.1.len() + 1).sum();
        let mut out = Vec::with_capacity(prefix.len() + body + SUFFIX.len());
        out.extend_from_slice(prefix.as_bytes());
        for (i, (_, payload)) in records.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(payload);
        }
        out.extend_from_slice(SUFFIX.as_bytes());
        out
    }

    fn prefix(&self, first: u64, last: u64, sent_ms: u64) -> String {
        // Field order and names follow `ferry_protocol::Batch`.
        format!(
            r#"{{"schema":{SCHEMA_VERSION},"stream":{},"message_id":{},"device":{},"fleet":{},"sent_ms":{sent_ms},"records":["#,
            json_str(self.stream.as_str()),
            json_str(&message_id(&self.device, self.stream, first, last)),
            json_str(&self.device),
            json_str(&self.fleet),
        )
    }
}

const SUFFIX: &str = "]}";

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialise")
}

/// A cheap shape check (first and last non-blank bytes are braces): enough
/// to keep an empty or truncated payload from breaking a whole batch,
/// without parsing every record.
fn looks_like_object(payload: &[u8]) -> bool {
    let trimmed = payload.trim_ascii();
    trimmed.first() == Some(&b'{') && trimmed.last() == Some(&b'}')
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::Batch;

    fn record(id: u64, pad: usize) -> Vec<u8> {
        format!(r#"{{"id":{id},"pad":"{}"}}"#, "x".repeat(pad)).into_bytes()
    }

    #[test]
    fn batches_parse_as_the_protocol_type() {
        let env = Envelope::new("dev-1", "plant-7", Stream::Telemetry, 4096).unwrap();
        let recs: Vec<(u64, Vec<u8>)> = (5..8).map(|id| (id, record(id, 3))).collect();
        let refs: Vec<(u64, &[u8])> = recs.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        assert_eq!(env.plan(refs.iter().map(|r| r.1)), Some(Plan::Publish(3)));
        let bytes = env.encode(&refs, 1234);
        let batch: Batch<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(batch.schema, SCHEMA_VERSION);
        assert_eq!(batch.stream, Stream::Telemetry);
        assert_eq!(batch.message_id, "dev-1:telemetry:5-7");
        assert_eq!(
            (batch.device.as_str(), batch.fleet.as_str()),
            ("dev-1", "plant-7")
        );
        assert_eq!(batch.sent_ms, 1234);
        let ids: Vec<u64> = batch
            .records
            .iter()
            .map(|r| r["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, [5, 6, 7]);
    }

    #[test]
    fn batches_never_exceed_the_limit() {
        // Many sizes, many limits: the encoded batch stays within the limit
        // even with the widest ids and timestamp, and takes as much as fits.
        for max in [300usize, 1000, 8192] {
            let env = Envelope::new("d", "f", Stream::Samples, max).unwrap();
            for pad in [0usize, 1, 17, 150, 190] {
                let recs: Vec<(u64, Vec<u8>)> = (0..200u64)
                    .map(|i| (u64::MAX - 200 + i, record(i, pad)))
                    .collect();
                let mut start = 0;
                while start < recs.len() {
                    let rest = &recs[start..];
                    match env.plan(rest.iter().map(|r| r.1.as_slice())).unwrap() {
                        Plan::Publish(n) => {
                            let refs: Vec<(u64, &[u8])> =
                                rest[..n].iter().map(|(i, p)| (*i, p.as_slice())).collect();
                            let bytes = env.encode(&refs, u64::MAX);
                            assert!(bytes.len() <= max, "{} > {max}", bytes.len());
                            serde_json::from_slice::<Batch<serde_json::Value>>(&bytes).unwrap();
                            if n < rest.len() {
                                // The next record would not have fitted.
                                let used: usize = rest[..n].iter().map(|r| r.1.len() + 1).sum();
                                assert!(used + rest[n].1.len() > env.budget());
                            }
                            start += n;
                        }
                        Plan::Drop(reason) => {
                            assert_eq!(reason, DropReason::TooLarge);
                            assert!(rest[0].1.len() > env.budget());
                            start += 1;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn oversized_and_malformed_heads_are_dropped_not_wedged() {
        let env = Envelope::new("d", "f", Stream::Events, 512).unwrap();
        let big = record(1, 600);
        let small = record(2, 5);
        assert_eq!(
            env.plan([big.as_slice(), small.as_slice()]),
            Some(Plan::Drop(DropReason::TooLarge))
        );
        // A big record behind small ones ends the batch before it.
        assert_eq!(
            env.plan([small.as_slice(), big.as_slice()]),
            Some(Plan::Publish(1))
        );
        assert_eq!(
            env.plan([b"".as_slice()]),
            Some(Plan::Drop(DropReason::NotAnObject))
        );
        assert_eq!(
            env.plan([small.as_slice(), b"[1]".as_slice()]),
            Some(Plan::Publish(1))
        );
        assert_eq!(env.plan(std::iter::empty()), None);
        assert!(Envelope::new("d", "f", Stream::Events, 100).is_none());
    }
}
