//! Kubelet's plugin-registration client sends the socket's *path* as the
//! HTTP/2 `:authority` (grpc-go `DialContext(path)`, still so in v1.36.3:
//! kubernetes/kubernetes#108254, #109081). The `h2` crate under tonic rejects
//! that as a malformed header (kubelet logs "stream terminated by RST_STREAM
//! with error code: PROTOCOL_ERROR"), so a tonic server cannot answer kubelet
//! directly. This shim sits between kubelet's connection and the in-process
//! tonic server: it copies bytes both ways and, in the client's HEADERS
//! frames, replaces the value of `:authority` with `localhost`. Nothing else
//! changes; the HPACK dynamic table stays in step because the rewritten field
//! keeps its representation (an entry added by the client is added by the
//! server too, only with the shorter value).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// `:authority` in the HPACK static table.
const AUTHORITY_INDEX: u64 = 1;
const REPLACEMENT: &[u8] = b"localhost";
/// Frames above this size are refused (h2's default max frame size is 16 KiB).
const MAX_FRAME_LEN: usize = 1 << 20;

/// Why a header block could not be rewritten.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RewriteError {
    #[error("truncated HPACK header block")]
    Truncated,
    #[error("HPACK integer overflows")]
    Overflow,
    #[error("malformed HEADERS frame padding")]
    Padding,
}

/// Copies `from` (kubelet) to `to` (the tonic server), rewriting `:authority`
/// in HEADERS frames. Returns at EOF.
pub async fn pump_client_to_server<R, W>(mut from: R, mut to: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut preface = [0_u8; PREFACE_LEN];
    if read_exact_or_eof(&mut from, &mut preface).await? {
        return to.shutdown().await;
    }
    to.write_all(&preface).await?;
    loop {
        let mut head = [0_u8; FRAME_HEADER_LEN];
        if read_exact_or_eof(&mut from, &mut head).await? {
            return to.shutdown().await;
        }
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        if len > MAX_FRAME_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "HTTP/2 frame too large",
            ));
        }
        let mut payload = vec![0_u8; len];
        from.read_exact(&mut payload).await?;
        let (kind, flags) = (head[3], head[4]);
        // A header block split over CONTINUATION frames is passed through
        // unchanged (grpc-go's request headers fit in one frame).
        if kind == TYPE_HEADERS && flags & FLAG_END_HEADERS != 0 {
            match rewrite_headers_payload(flags, &payload) {
                Ok((new_flags, new_payload)) => {
                    payload = new_payload;
                    let len = payload.len();
                    head[0] = (len >> 16) as u8;
                    head[1] = (len >> 8) as u8;
                    head[2] = len as u8;
                    head[4] = new_flags;
                }
                Err(error) => {
                    return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, error));
                }
            }
        }
        to.write_all(&head).await?;
        to.write_all(&payload).await?;
    }
}

/// Fills `buf`; true when the stream ended before the first byte.
async fn read_exact_or_eof<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut [u8],
) -> std::io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = from.read(&mut buf[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(true);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(false)
}

/// A HEADERS payload with `:authority` rewritten; padding is dropped (the
/// PADDED flag cleared), the priority fields kept.
pub fn rewrite_headers_payload(flags: u8, payload: &[u8]) -> Result<(u8, Vec<u8>), RewriteError> {
    let mut body = payload;
    let mut new_flags = flags;
    if flags & FLAG_PADDED != 0 {
        let (&pad, rest) = body.split_first().ok_or(RewriteError::Padding)?;
        let keep = rest
            .len()
            .checked_sub(usize::from(pad))
            .ok_or(RewriteError::Padding)?;
        body = &rest[..keep];
        new_flags &= !FLAG_PADDED;
    }
    let mut out = Vec::with_capacity(body.len());
    if flags & FLAG_PRIORITY != 0 {
        if body.len() < 5 {
            return Err(RewriteError::Truncated);
        }
        out.extend_from_slice(&body[..5]);
        body = &body[5..];
    }
    out.extend(rewrite_header_block(body)?);
    Ok((new_flags, out))
}

/// An HPACK header block with every `:authority` value replaced.
pub fn rewrite_header_block(block: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::with_capacity(block.len());
    let mut at = 0;
    while at < block.len() {
        let first = block[at];
        if first & 0x80 != 0 {
            // Indexed field.
            let end = skip_integer(block, at, 7)?;
            out.extend_from_slice(&block[at..end]);
            at = end;
        } else if first & 0xE0 == 0x20 {
            // Dynamic table size update.
            let end = skip_integer(block, at, 5)?;
            out.extend_from_slice(&block[at..end]);
            at = end;
        } else {
            // Literal: with incremental indexing (01), without indexing (0000)
            // or never indexed (0001).
            let prefix = if first & 0xC0 == 0x40 { 6 } else { 4 };
            let (index, name_end) = read_integer(block, at, prefix)?;
            let mut is_authority = index == AUTHORITY_INDEX;
            let mut value_start = name_end;
            if index == 0 {
                let (name, end) = read_string(block, name_end)?;
                is_authority = name == Some(b":authority".as_slice());
                value_start = end;
            }
            let (_, value_end) = read_string(block, value_start)?;
            out.extend_from_slice(&block[at..value_start]);
            if is_authority {
                // Plain (not Huffman) string; 9 < 127 fits the 7-bit prefix.
                out.push(REPLACEMENT.len() as u8);
                out.extend_from_slice(REPLACEMENT);
            } else {
                out.extend_from_slice(&block[value_start..value_end]);
            }
            at = value_end;
        }
    }
    Ok(out)
}

/// Decodes an HPACK integer with an N-bit prefix starting at `at`; returns it
/// and the offset after it.
fn read_integer(block: &[u8], at: usize, prefix_bits: u32) -> Result<(u64, usize), RewriteError> {
    let mask = (1_u16 << prefix_bits) - 1;
    let first = *block.get(at).ok_or(RewriteError::Truncated)?;
    let mut value = u64::from(u16::from(first) & mask);
    let mut at = at + 1;
    if value < u64::from(mask) {
        return Ok((value, at));
    }
    let mut shift = 0_u32;
    loop {
        let byte = *block.get(at).ok_or(RewriteError::Truncated)?;
        at += 1;
        if shift > 56 {
            return Err(RewriteError::Overflow);
        }
        value += u64::from(byte & 0x7F) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok((value, at));
        }
    }
}

fn skip_integer(block: &[u8], at: usize, prefix_bits: u32) -> Result<usize, RewriteError> {
    read_integer(block, at, prefix_bits).map(|(_, end)| end)
}

/// An HPACK string literal at `at`: its raw bytes when not Huffman-coded, and
/// the offset after it.
fn read_string(block: &[u8], at: usize) -> Result<(Option<&[u8]>, usize), RewriteError> {
    let huffman = block.get(at).ok_or(RewriteError::Truncated)? & 0x80 != 0;
    let (len, start) = read_integer(block, at, 7)?;
    let len = usize::try_from(len).map_err(|_| RewriteError::Overflow)?;
    let end = start.checked_add(len).ok_or(RewriteError::Overflow)?;
    let bytes = block.get(start..end).ok_or(RewriteError::Truncated)?;
    Ok(((!huffman).then_some(bytes), end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    /// What grpc-go sends for kubelet's registration dial: `:method POST`
    /// (static 3), `:scheme http` (6), `:path` literal, `:authority` literal
    /// with incremental indexing (name index 1) holding the socket path,
    /// then a literal with a literal name, and a Huffman-flagged value.
    #[test]
    fn authority_with_a_path_becomes_localhost_and_nothing_else_changes() {
        let path = b"/var/lib/kubelet/plugins_registry/csi.scopehold.dev-reg.sock";
        let mut block = vec![0x83, 0x86];
        block.push(0x44); // :path, incremental indexing, name index 4
        block.extend(string(b"/pluginregistration.Registration/GetInfo"));
        block.push(0x41); // :authority, incremental indexing
        block.extend(string(path));
        block.push(0x40); // literal name
        block.extend(string(b"te"));
        block.extend(string(b"trailers"));
        block.push(0x0f); // without indexing, name index 15+ (multi-byte integer)
        block.push(0x0d); // 15 + 13 = 28: content-type? any index > 14
        block.extend([0x83, 0xaa, 0xbb, 0xcc]); // Huffman-flagged 3-byte value
        block.push(0xbe); // indexed dynamic entry 62

        let out = rewrite_header_block(&block).unwrap();
        let mut expected = vec![0x83, 0x86, 0x44];
        expected.extend(string(b"/pluginregistration.Registration/GetInfo"));
        expected.push(0x41);
        expected.extend(string(b"localhost"));
        expected.push(0x40);
        expected.extend(string(b"te"));
        expected.extend(string(b"trailers"));
        expected.extend([0x0f, 0x0d, 0x83, 0xaa, 0xbb, 0xcc, 0xbe]);
        assert_eq!(out, expected);
    }

    #[test]
    fn literal_authority_name_never_indexed_is_rewritten_too() {
        let mut block = vec![0x10];
        block.extend(string(b":authority"));
        block.extend(string(b"/run/x.sock"));
        let out = rewrite_header_block(&block).unwrap();
        let mut expected = vec![0x10];
        expected.extend(string(b":authority"));
        expected.extend(string(b"localhost"));
        assert_eq!(out, expected);
    }

    #[test]
    fn padding_is_dropped_and_priority_kept() {
        let mut block = vec![0x41];
        block.extend(string(b"/s"));
        let mut payload = vec![3]; // pad length
        payload.extend([0, 0, 0, 0, 7]); // priority
        payload.extend(&block);
        payload.extend([0, 0, 0]);
        let (flags, out) =
            rewrite_headers_payload(FLAG_END_HEADERS | FLAG_PADDED | FLAG_PRIORITY, &payload)
                .unwrap();
        assert_eq!(flags, FLAG_END_HEADERS | FLAG_PRIORITY);
        let mut expected = vec![0, 0, 0, 0, 7, 0x41];
        expected.extend(string(b"localhost"));
        assert_eq!(out, expected);
    }

    #[test]
    fn garbage_is_refused_not_passed_on() {
        assert_eq!(
            rewrite_header_block(&[0x41, 0x7f]),
            Err(RewriteError::Truncated)
        );
        assert_eq!(
            rewrite_header_block(&[0x41, 0x05, b'a']),
            Err(RewriteError::Truncated)
        );
        assert_eq!(
            rewrite_header_block(&[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]),
            Err(RewriteError::Overflow)
        );
        assert_eq!(
            rewrite_headers_payload(FLAG_END_HEADERS | FLAG_PADDED, &[9, 1]),
            Err(RewriteError::Padding)
        );
    }

    #[tokio::test]
    async fn frames_are_copied_with_only_the_headers_rewritten() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
        let mut block = vec![0x41];
        block.extend(string(b"/tmp/a.sock"));
        input.extend([
            0,
            0,
            block.len() as u8,
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            0,
            0,
            0,
            1,
        ]);
        input.extend(&block);
        input.extend([0, 0, 2, 0, 1, 0, 0, 0, 1, 0xab, 0xcd]); // DATA
        let mut output = Vec::new();
        pump_client_to_server(input.as_slice(), &mut output)
            .await
            .unwrap();
        let mut expected = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        expected.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        expected.extend([0, 0, 11, TYPE_HEADERS, FLAG_END_HEADERS, 0, 0, 0, 1, 0x41]);
        expected.extend(string(b"localhost"));
        expected.extend([0, 0, 2, 0, 1, 0, 0, 0, 1, 0xab, 0xcd]);
        assert_eq!(output, expected);
    }
}
