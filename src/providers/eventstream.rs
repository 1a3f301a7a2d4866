//! The AWS event-stream binary framing (`application/vnd.amazon.eventstream`), parsed incrementally:
//! a 12-byte prelude (total length, headers length, prelude CRC), headers, payload, message CRC.

const PRELUDE: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FrameError {
    #[error("event-stream prelude checksum mismatch")]
    PreludeCrc,
    #[error("event-stream message checksum mismatch")]
    MessageCrc,
    #[error("event-stream frame has impossible lengths ({total} total, {headers} of headers)")]
    Lengths { total: usize, headers: usize },
    #[error("event-stream header is malformed")]
    Header,
    #[error("event stream ended inside a frame")]
    Truncated,
    #[error("an event-stream frame of {total} bytes is larger than the limit of {max} bytes")]
    TooLarge { total: usize, max: usize },
}

/// One decoded message: its string headers and its payload.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Frames are refused at their prelude when larger than `max`, before any of them is buffered.
#[derive(Debug)]
pub struct FrameParser {
    buf: Vec<u8>,
    max: usize,
}

impl Default for FrameParser {
    fn default() -> Self {
        FrameParser {
            buf: Vec::new(),
            max: super::sse::DEFAULT_MAX_FRAME,
        }
    }
}

impl FrameParser {
    pub fn set_max_frame(&mut self, max: usize) {
        self.max = max;
    }

    /// Appends every complete frame in `bytes` (plus what was buffered) to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Frame>) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while self.buf.len() - start >= PRELUDE {
            let b = &self.buf[start..];
            let total = u32_at(b, 0) as usize;
            let headers_len = u32_at(b, 4) as usize;
            if crc32fast::hash(&b[..8]) != u32_at(b, 8) {
                return Err(FrameError::PreludeCrc);
            }
            if total < PRELUDE + 4 + headers_len {
                return Err(FrameError::Lengths {
                    total,
                    headers: headers_len,
                });
            }
            if total > self.max {
                return Err(FrameError::TooLarge {
                    total,
                    max: self.max,
                });
            }
            if b.len() < total {
                break;
            }
            let body_end = total - 4;
            if crc32fast::hash(&b[..body_end]) != u32_at(b, body_end) {
                return Err(FrameError::MessageCrc);
            }
            out.push(Frame {
                headers: parse_headers(&b[PRELUDE..PRELUDE + headers_len])?,
                payload: b[PRELUDE + headers_len..body_end].to_vec(),
            });
            start += total;
        }
        self.buf.drain(..start);
        Ok(())
    }

    /// End of stream: leftover bytes mean the last frame was cut off.
    pub fn finish(&mut self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// String headers are kept; every other type is skipped by its declared width.
fn parse_headers(mut b: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let mut headers = Vec::new();
    let take = |b: &mut &[u8], n: usize| -> Result<Vec<u8>, FrameError> {
        if b.len() < n {
            return Err(FrameError::Header);
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head.to_vec())
    };
    while !b.is_empty() {
        let name_len = take(&mut b, 1)?[0] as usize;
        let name = String::from_utf8(take(&mut b, name_len)?).map_err(|_| FrameError::Header)?;
        let kind = take(&mut b, 1)?[0];
        let fixed = match kind {
            0 | 1 => Some(0),
            2 => Some(1),
            3 => Some(2),
            4 => Some(4),
            5 | 8 => Some(8),
            9 => Some(16),
            6 | 7 => None,
            _ => return Err(FrameError::Header),
        };
        match fixed {
            Some(n) => {
                take(&mut b, n)?;
            }
            None => {
                let len = take(&mut b, 2)?;
                let value = take(&mut b, u16::from_be_bytes([len[0], len[1]]) as usize)?;
                if kind == 7 {
                    let value = String::from_utf8(value).map_err(|_| FrameError::Header)?;
                    headers.push((name, value));
                }
            }
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_sim::encode_frame as encode;
    use proptest::prelude::*;

    fn parse(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Frame>, FrameError> {
        let mut p = FrameParser::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            p.feed(&bytes[last..c], &mut out)?;
            last = c;
        }
        p.feed(&bytes[last..], &mut out)?;
        p.finish()?;
        Ok(out)
    }

    fn sample() -> Vec<u8> {
        let mut wire = encode(
            &[(":message-type", "event"), (":event-type", "messageStart")],
            br#"{"role":"assistant"}"#,
        );
        wire.extend(encode(
            &[(":event-type", "contentBlockDelta")],
            br#"{"delta":{"text":"hi"}}"#,
        ));
        wire
    }

    #[test]
    fn decodes_a_known_frame_from_the_spec_layout() {
        // A frame with no headers and payload "{'foo':'bar'}", as in the event-stream test vectors.
        let frame: [u8; 29] = [
            0x00, 0x00, 0x00, 0x1D, 0x00, 0x00, 0x00, 0x00, 0xfd, 0x52, 0x8c, 0x5a, 0x7b, 0x27,
            0x66, 0x6f, 0x6f, 0x27, 0x3a, 0x27, 0x62, 0x61, 0x72, 0x27, 0x7d, 0xc3, 0x65, 0x39,
            0x36,
        ];
        let frames = parse(&frame, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(frames[0].payload, b"{'foo':'bar'}");
        assert_eq!(encode(&[], b"{'foo':'bar'}"), frame);
    }

    #[test]
    fn skips_non_string_headers_by_width() {
        let mut wire = encode(&[(":event-type", "x")], b"{}");
        // Rebuild with an int header in front of the string one.
        let mut h = vec![3u8];
        h.extend_from_slice(b"num");
        h.push(4);
        h.extend_from_slice(&7i32.to_be_bytes());
        h.push(11);
        h.extend_from_slice(b":event-type");
        h.push(7);
        h.extend_from_slice(&1u16.to_be_bytes());
        h.push(b'x');
        let total = (12 + h.len() + 2 + 4) as u32;
        wire.clear();
        wire.extend_from_slice(&total.to_be_bytes());
        wire.extend_from_slice(&(h.len() as u32).to_be_bytes());
        let c = crc32fast::hash(&wire);
        wire.extend_from_slice(&c.to_be_bytes());
        wire.extend_from_slice(&h);
        wire.extend_from_slice(b"{}");
        let c = crc32fast::hash(&wire);
        wire.extend_from_slice(&c.to_be_bytes());
        let frames = parse(&wire, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            frames[0].headers,
            vec![(":event-type".to_string(), "x".to_string())]
        );
    }

    #[test]
    fn bad_checksums_and_truncation_are_rejected() {
        let good = sample();
        let mut bad_prelude = good.clone();
        bad_prelude[9] ^= 1;
        assert_eq!(parse(&bad_prelude, &[]), Err(FrameError::PreludeCrc));
        let mut bad_payload = good.clone();
        let at = good.len() - 6;
        bad_payload[at] ^= 1;
        assert_eq!(parse(&bad_payload, &[]), Err(FrameError::MessageCrc));
        assert_eq!(
            parse(&good[..good.len() - 1], &[]),
            Err(FrameError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn same_frames_however_the_bytes_are_cut(cuts in proptest::collection::vec(0..100usize, 0..10)) {
            let wire = sample();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
            cuts.sort_unstable();
            prop_assert_eq!(parse(&wire, &cuts), parse(&wire, &[]));
        }

        #[test]
        fn random_corruption_never_panics(flip in 0..60usize, bit in 0..8u8) {
            let mut wire = sample();
            let i = flip.min(wire.len() - 1);
            wire[i] ^= 1 << bit;
            prop_assert!(parse(&wire, &[]).is_err());
        }
    }
}
